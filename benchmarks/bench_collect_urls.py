"""URL-list collection speed (target: >= 300 images/s at 256x256 from a loopback server, 2 cores.

The server (tests/integration/data_server.py, a ThreadingHTTPServer) runs in its own process and
serves 640x480 JPEGs (a pool of 64 distinct pictures, pre-encoded); the client is the real
`collect_urls` (download, validate, resize + centre crop to 256, JPEG re-encode, tar shards,
manifests). Measured: ok images per second of wall time, end to end, and - because a shared
machine's wall clock says little - the CPU time client + server spend per image, turned into the
rate two otherwise idle cores would sustain (2 / CPU-seconds per image).

    python -m benchmarks.bench_collect_urls      # BENCH_QUICK=1 for a smoke run
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import emit, quick, section
from dalle.catalog import Artefacts
from dalle.config_sections import Paths
from dalle.data.url_list import collect_urls
from dalle.tracking import NullTracker

SOURCE_SIZE = (640, 480)


def _serve(port_queue: "mp.Queue[int]") -> None:
    from tests.integration.data_server import ImageServer

    server = ImageServer(image_size=SOURCE_SIZE, image_pool=64)
    for n in range(64):
        server.image(n)  # pre-encode: the server should not be what is measured
    server.request_queue_size = 256
    port_queue.put(server.server_address[1])
    server.serve_forever()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n_urls: int, workers: int, image_size: int = 256) -> tuple[float, int, float]:
    """(wall seconds, ok images, client + server CPU seconds)."""
    queue: "mp.Queue[int]" = mp.Queue()
    proc = mp.Process(target=_serve, args=(queue,), daemon=True)
    proc.start()
    port = queue.get(timeout=60)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n_urls)]
            list_path = Path(tmp) / "list.tsv"
            pd.DataFrame({"url": urls, "caption": ["a picture"] * n_urls}).to_csv(
                list_path, sep="\t", index=False)
            base = section("data")
            url_list = dict(base.url_list.model_dump(), path=str(list_path), workers=workers,
                            per_host=workers, allow_private=True, timeout_s=30.0)
            data = section("data", source="url_list", image_size=image_size, shard_size=1000,
                           url_list=url_list)
            start, cpu0, server0 = time.perf_counter(), time.process_time(), _cpu_s(proc.pid)
            paths = Paths(**{k: str(Path(tmp) / v) for k, v in section("paths").model_dump().items()})
            metrics = collect_urls(data, Artefacts(paths), NullTracker(), 0)
            cpu = time.process_time() - cpu0 + _cpu_s(proc.pid) - server0
            return time.perf_counter() - start, int(metrics["ok"]), cpu
    finally:
        proc.terminate()
        proc.join()


def main() -> None:
    n_urls = 200 if quick() else 3000
    cores = len(os.sched_getaffinity(0))
    for workers in (4, 8, 16):  # per_host = workers (one loopback host)
        seconds, ok, cpu = run(n_urls, workers)
        rate, cpu_ms = ok / seconds, 1000 * cpu / max(ok, 1)
        print(f"workers {workers:>3}: {ok}/{n_urls} ok in {seconds:.1f}s = {rate:.0f} images/s wall; "
              f"{cpu_ms:.2f} CPU-ms/image (client + server) = {2000 / cpu_ms:.0f} images/s on 2 "
              f"free cores (256x256 from {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG, load "
              f"{os.getloadavg()[0]:.1f} on {cores} cores)")
        emit("data_collect", f"url_list-256px-w{workers}", "dalle", "images/s", rate,
             note=f"wall; loopback server, {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG, {cores} cores")
        emit("data_collect", f"url_list-256px-w{workers}-cpu", "dalle", "images/s", 2000 / cpu_ms,
             note="2 cores / (client + server CPU time per image)")


if __name__ == "__main__":
    main()
