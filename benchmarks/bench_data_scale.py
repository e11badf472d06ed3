"""Data at scale: every stage of `DALLE_PRESET=cc3m-gpu` on a local collection of 100,000 images
at 256 x 256 (19 GB decoded), each stage's peak RSS and wall time; the loader's decode throughput
per worker at 256 px; and the streaming path against the in-memory one feeding the default dVAE.

    python -m benchmarks.bench_data_scale       # ~1 h on 2 cores; BENCH_QUICK=1: 600 images
    BENCH_DATA_N=20000 python -m benchmarks.bench_data_scale

The collection is the synthetic world drawn at 256 px (no download here), written by collect,
deduplicated and prepared into JPEG clean shards exactly as a real one would be; it is kept in
benchmarks/.data-scale/<n> and reused. The models are the cc3m-gpu ones with widths and step
counts cut through -S so that a CPU runs them (WIDTHS below); every stage runs as its own
process through benchmarks/stage_rss.py, so each peak is that stage's alone. `encode` gets a
time budget (BENCH_ENCODE_S, 900 s): at ~15 images/s for even the narrowest dVAE at 256 px on two
cores, the whole collection would take hours; it encodes shard by shard (train and val of each
raw shard in turn) and is resumable, so the later stages run on the shards it finished.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, quick

ROOT = Path(__file__).resolve().parents[1]
N = 600 if quick() else int(os.environ.get("BENCH_DATA_N", "100000"))
COLLECTION = {  # a real collection's path through the stages; the synthetic world at 256 px
    "data.source": "synthetic", "data.synthetic.n_images": N, "data.synthetic.holdout": "[]",
    "data.shard_size": 200 if quick() else 2000, "dedup.remove_near": "false",
    "data.val_fraction": 0.1 if quick() else 0.005,
    "tracking.enabled": "false", "loader.workers": 2,
}
WIDTHS = {  # cc3m-gpu cut to CPU widths and a few steps
    "dvae.vocab_size": 512, "dvae.n_hid": 8, "dvae.dec_n_hid": 8, "dvae.n_init": 8,
    "dvae.batch_size": 8, "dvae.steps": 6, "dvae.log_every": 2, "encode.batch_size": 32,
    "prior.n_layers": 2, "prior.d_model": 64, "prior.n_heads": 4, "prior.batch_size": 2,
    "prior.steps": 4, "prior.warmup_steps": 1, "prior.log_every": 1, "prior.sample_every": 1000,
    "prior.precision": "fp32", "clip.steps": 4, "clip.batch_size": 8, "clip.log_every": 1,
    "generate.n_captions": 2, "generate.candidates": 2, "generate.keep": 1,
    "generate.batch_size": 2, "evaluate.blur_radii": "[0,2]", "evaluate.rerank_sizes": "[1,2]",
}
ENCODE_BUDGET_S = float(os.environ.get("BENCH_ENCODE_S", "60" if quick() else "900"))
STAGES = ("collect", "dedup", "prepare", "tokenizer", "train_dvae", "encode", "train_clip",
          "train_prior", "generate", "evaluate")


def _sets(root: Path, extra: dict[str, Any]) -> list[str]:
    paths = {f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "tokens", "metrics",
                                              "models", "samples", "plots")}
    sets = {**COLLECTION, **WIDTHS, **paths, "evaluate.cache_dir": root / "fid-cache", **extra}
    return [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]


def run_stage(stage: str, root: Path, preset: str | None, extra: dict[str, Any],
              budget_s: float | None = None) -> dict[str, Any]:
    """The stage in its own process; its RSS line (peak MiB of the process and of its workers).
    With `budget_s`, the stage gets SIGTERM after that long (it stops cleanly, exit 143)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DALLE_PRESET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stage_rss.py"), stage,
           "--params", str(ROOT / "params.yaml"), *(["--preset", preset] if preset else []),
           *_sets(root, extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
    line = next((x for x in out.splitlines() if x.startswith("RSS ")), None)
    if proc.returncode not in (0, 143) or line is None:
        raise SystemExit(f"{stage} failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(line[4:])


def scale(preset: str = "cc3m-gpu") -> None:
    root = ROOT / "benchmarks" / ".data-scale" / str(N)
    done = (root / "clean" / "manifest.parquet").is_file()
    for stage in STAGES:
        if done and stage in ("collect", "dedup", "prepare"):
            continue  # the collection is kept between runs
        budget = ENCODE_BUDGET_S if stage == "encode" else None  # the shards done by then
        rss = run_stage(stage, root, preset, {}, budget)
        peak = max(rss["self_mb"], rss["children_mb"])
        case = f"{N // 1000}k-256px" if N >= 1000 else f"{N}-256px"
        emit("data_scale", case, "dalle", f"{stage} peak RSS MiB", peak, higher_is_better=False,
             note=f"{preset} -S widths; workers {rss['children_mb']:.0f} MiB")
        emit("data_scale", case, "dalle", f"{stage} s", rss["seconds"], higher_is_better=False,
             peak_rss_mb=peak, note="stopped after its time budget (resumable)"
             if rss["exit"] else "")


def decode_per_worker(root: Path) -> None:
    """Images/s one process decodes from the clean JPEG shards at 256 px (what a worker does)."""
    from dalle.catalog import Artefacts
    from dalle.config import load_params
    from dalle.data.reader import ShardSet, split_index

    art = Artefacts(load_params(ROOT / "params.yaml", overrides=[
        f"paths.clean={root / 'clean'}"]).paths)
    data = ShardSet(split_index(art, "train"))
    n = min(len(data), 300 if quick() else 3000)
    t0 = time.perf_counter()
    for i in range(n):
        data[i]
    emit("data_scale", "decode-256px-jpeg", "dalle", "images/s per worker",
         n / (time.perf_counter() - t0), note="read from the tar (wids) + PIL decode + RGB")


def streaming_vs_memory() -> None:
    """The default dVAE fed from memory vs streamed (2 workers), alternated twice: images/s of
    its training loop (steps x batch / the loop's seconds, evaluation excluded)."""
    from dalle.config import load_params

    batch = load_params(ROOT / "params.yaml").dvae.batch_size
    root = ROOT / "benchmarks" / ".data-scale" / "default"
    base = {"tracking.enabled": "false", "dvae.steps": 40 if quick() else 300,
            "dvae.log_every": 20 if quick() else 100}
    if quick():
        base.update({"data.synthetic.n_images": 600, "data.shard_size": 200})
    for stage in ("collect", "dedup", "prepare"):
        if not (root / "clean" / "manifest.parquet").is_file():
            _default_stage(stage, root, base)
    rates: dict[str, list[float]] = {"in-memory": [], "streaming": []}
    for _ in range(2):
        for name, mb in (("in-memory", 4096), ("streaming", 0)):
            _default_stage("train_dvae", root, {**base, "loader.in_memory_max_mb": mb})
            m = json.loads((root / "metrics" / "dvae.json").read_text())
            rates[name].append(m["steps"] * batch / m["train_seconds"])  # the loop's own time
    for name, values in rates.items():
        emit("data_loader", "default-dvae", "dalle" if name == "streaming" else "dalle-in-memory",
             "images/s", float(np.median(values)), note=f"{name}; median of 2, alternated")


def _default_stage(stage: str, root: Path, extra: dict[str, Any]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sets = {**extra, **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "metrics", "models",
                                                        "plots")}}
    cmd = [sys.executable, "-m", f"stages.{stage}", "--params", str(ROOT / "params.yaml"),
           *(a for k, v in sets.items() for a in ("-S", f"{k}={v}"))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{stage} failed: {proc.stderr[-2000:]}")


def main() -> None:
    scale()
    decode_per_worker(ROOT / "benchmarks" / ".data-scale" / str(N))
    streaming_vs_memory()


if __name__ == "__main__":
    main()
