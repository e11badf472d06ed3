"""benchmarks/bench_attention.py and bench_prior.py run end to end at BENCH_QUICK sizes and print
the rows docs/benchmarks.md is built from (structured vs masked, cached vs recompute)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_quick  # noqa: E402


_run = run_quick


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
