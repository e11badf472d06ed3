"""The side-by-side benchmark scripts still drive this project's models (BENCH_QUICK=1: tiny shapes).

Run in the project venv, where the peers (DALLE-pytorch, transformers) may be absent: then their
rows must say so (value null + "unavailable" note) instead of failing the script.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_quick  # noqa: E402


_run = run_quick


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
