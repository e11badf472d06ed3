"""benchmarks/bench_attention.py and bench_prior.py run end to end at BENCH_QUICK sizes and print
the rows docs/benchmarks.md is built from (structured vs masked, cached vs recompute)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.common import parse_lines  # noqa: E402


def _run(script: str) -> list[dict]:
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{script}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return parse_lines(r.stdout)


def test_bench_attention_rows() -> None:
    rows = _run("bench_attention")
    cases = {r["case"] for r in rows}
    assert cases == {"quick row", "quick column", "quick conv", "quick train step"}
    for case in cases:
        got = {(r["impl"], r["metric"]) for r in rows if r["case"] == case}
        unit = "tokens/s" if case.endswith("step") else "ms"
        assert {("dalle-masked", unit), ("dalle-structured", unit), ("dalle-structured", "speed-up vs masked")} == got
    assert all(r["value"] is not None and r["value"] > 0 for r in rows)


def test_bench_prior_rows() -> None:
    rows = _run("bench_prior")
    speedup = [r for r in rows if r["metric"] == "speed-up vs recompute"]
    assert len(speedup) == 1 and speedup[0]["value"] > 0
    fractions = [r for r in rows if r["metric"] == "fraction of matmul rate"]
    assert {r["impl"] for r in fractions} == {"dalle-fp32", "dalle-bf16"}
    assert all(0 < r["value"] for r in fractions)
