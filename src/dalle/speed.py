"""A fixed reference for stage times: torch's fp32 matmul GFLOP/s, measured in the same process.

The 2-core machine's speed varies about 2x from day to day. Every stage records this figure next
to its own wall time (`stage_seconds`, `reference_matmul_gflops` in its `metrics/<stage>.json`),
so a slow day can be told apart from a slow change: compare stage_seconds x gflops, not seconds.
It is the GEMM that `benchmarks/bench_matmul.py` reports (1024^3, fp32, torch's threads).
"""
from __future__ import annotations

import time

import torch

SIDE = 1024  # one 1024^3 GEMM: ~2 GFLOP, about 10 ms on 2 cores


def matmul_gflops(repeats: int = 5, side: int = SIDE) -> float:
    """Median fp32 GFLOP/s of a [side, side] @ [side, side] product over `repeats` runs."""
    gen = torch.Generator().manual_seed(0)  # never the global stream: a stage's draws stay its own
    a = torch.randn(side, side, generator=gen)  # [side, side]
    b = torch.randn(side, side, generator=gen)  # [side, side]
    torch.mm(a, b)  # warm-up: thread pool and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2.0 * side ** 3 / times[len(times) // 2] / 1e9
