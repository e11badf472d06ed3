"""Peak resident memory of one pipeline stage, run in this process as `python -m stages.<name>`.

    python benchmarks/stage_rss.py <stage> [--params F] [--preset P] [-S key=value ...]

Runs the stage (its usual command line) and prints one line `RSS {"stage": ..., "self_mb": ...,
"children_mb": ..., "seconds": ...}`: the process's own peak RSS (VmHWM of /proc/self/status:
the high-water mark of this program's memory since exec) and the largest peak of any child it
waited for (DataLoader workers; getrusage). getrusage's own figure is not used for the process
itself: Linux carries the parent's high-water mark across fork and exec into it, so a stage
started by a large process (a long pytest run) would report at least the parent's size. Used by the bounded-memory test and bench_data_scale.py.
"""
from __future__ import annotations

import importlib
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `stages` package


def own_peak_mb() -> float:
    """Peak RSS of this process image (MiB): VmHWM, else getrusage where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)


def main(argv: list[str]) -> int:
    name, args = argv[0], argv[1:]
    stage = importlib.import_module(f"stages.{name}").STAGE  # only what the stage imports
    t0, code = time.perf_counter(), 0
    try:
        stage.main(args)
    except SystemExit as exc:  # a stage stopped early (e.g. SIGTERM after a time budget)
        code = int(exc.code or 0)
    me = own_peak_mb()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RSS " + json.dumps({"stage": name, "self_mb": round(me, 1), "children_mb": round(kids, 1),
                               "seconds": round(time.perf_counter() - t0, 1), "exit": code}),
          flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
