"""Synthetic world throughput: render + shard writing (target: >= 2,000 images/s on 2
cores at 64x64), render alone on one core, and the oracle's parse rate.

    python -m benchmarks.bench_synthetic          # BENCH_QUICK=1 for a seconds-long smoke run
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, quick, threads
from dalle.config import load_params
from dalle.data.synthetic import collect_synthetic, scene
from dalle.eval.oracle import parse
from dalle.tracking import NullTracker

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    n = 2000 if quick() else 20000
    workers = threads()
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(REPO / "params.yaml", overrides=[
            f"paths.raw={tmp}/raw", f"data.synthetic.n_images={n}", "data.shard_size=1000"])
        cpu0, start = _cpu_seconds(), time.perf_counter()
        collect_synthetic(params.data, params.paths, NullTracker(), workers=workers)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    emit("data_synthetic", f"{n}@64px", "dalle", "images/s", n / seconds,
         note=f"render+png+shards+manifest, {workers} processes")
    # on a shared, oversubscribed machine wall time lies; CPU time x cores is what idle cores give
    emit("data_synthetic", f"{n}@64px", "dalle", "images/cpu-s", n / cpu,
         note="per CPU-second of the parent + workers; x2 = 2 idle cores")
    print(f"collect_synthetic: {n} images in {seconds:.2f}s = {n / seconds:.0f} images/s "
          f"({workers} processes; target >= 2000 on 2 cores); {n / cpu:.0f} images per CPU-second")
    cfg = params.data.synthetic
    m = n // 10
    start = time.perf_counter()
    images = [scene(cfg, 64, i)[3] for i in range(m)]
    emit("data_synthetic", "render-1core", "dalle", "images/s", m / (time.perf_counter() - start),
         note="spec+caption+4x supersampled render, one process")
    start = time.perf_counter()
    for img in images:
        parse(img)
    emit("data_synthetic", "oracle-parse", "dalle", "images/s", m / (time.perf_counter() - start),
         note="dalle.eval.oracle.parse, one process")


if __name__ == "__main__":
    main()
