"""benchmarks/stage_rss.py measures the stage's own peak, not its parent's: Linux carries a
parent's RSS high-water mark across fork + exec into getrusage(RUSAGE_SELF), which made every
stage started from a large pytest process report the same ~1.5 GB (CI, 3 Dec)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = ("import sys, resource; sys.path.insert(0, sys.argv[1]); "
         "from benchmarks.stage_rss import own_peak_mb; "
         "print(own_peak_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")


def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 400 MiB resident here
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], capture_output=True, text=True,
                         check=True)
    own, inherited = map(float, out.stdout.split())
    assert inherited >= 400  # what getrusage alone would have reported for the child
    assert own < 100, own  # a bare interpreter
    del ballast
