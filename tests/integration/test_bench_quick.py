"""The side-by-side benchmark scripts still drive this project's models (BENCH_QUICK=1: tiny shapes).

Run in the project venv, where the peers (DALLE-pytorch, transformers) may be absent: then their
rows must say so (value null + "unavailable" note) instead of failing the script.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.common import parse_lines  # noqa: E402


def _run(script: str) -> list[dict]:
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{script}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return parse_lines(r.stdout)


@pytest.mark.parametrize("script, sections", [
    ("bench_peers_prior", {"prior_train"}),
    ("bench_peers_sampling", {"sampling"}),
    ("bench_peers_dvae", {"dvae_train", "dvae_encode"}),
])
def test_quick_bench_measures_this_project(script: str, sections: set[str]) -> None:
    rows = _run(script)
    ours = [r for r in rows if r["impl"] == "dalle"]
    assert {r["section"] for r in ours} == sections
    assert all(r["value"] is not None and r["value"] > 0 for r in ours), ours
    for r in rows:
        if r["value"] is None:
            assert r["impl"] != "dalle" and r["note"].startswith("unavailable:"), r

    if script == "bench_peers_prior":  # MFU against the ceiling timed in the same run
        ceiling = [r for r in rows if r["impl"] == "torch-matmul"]
        mfu = [r for r in ours if r["metric"] == "MFU"]
        assert ceiling and ceiling[0]["value"] > 0
        assert mfu and 0 < mfu[0]["value"] < 1.5  # a fraction of the ceiling (noise can push it past 1)
