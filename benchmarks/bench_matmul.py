"""The physical ceiling: torch's own dense matmul on this machine (the MFU denominator).

Prints GFLOP/s for square GEMMs and for the GEMM shapes of the prior's MLP at both benchmark shapes,
in fp32 and bf16 (this CPU has AVX-512 BF16 but no AMX: bf16 GEMMs are not faster than fp32 here).
`peak_flops()` is what bench_peers_prior.py divides by to report MFU.
"""
from __future__ import annotations

import torch

from benchmarks.common import emit, quick, threads, time_interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_flops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median FLOP/s of one [m, k] @ [k, n] product."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    t = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=2)["mm"]
    return 2.0 * m * k * n / t


def peak_flops(dtype: torch.dtype = torch.float32) -> float:
    """The matmul ceiling: best FLOP/s over square GEMMs of 1024..2048 (quick: 256)."""
    sizes = (256,) if quick() else (1024, 2048)
    return max(gemm_flops(n, n, n, dtype) for n in sizes)


def main() -> None:
    torch.set_num_threads(threads())
    note = f"{threads()} threads"
    squares = (256,) if quick() else (1024, 2048)
    # the prior's MLP GEMMs: [batch * seq, d] @ [d, 4d] at the two benchmark shapes
    mlp = [("default-mlp", 64 * 96, 256, 1024), ("paper-shaped-mlp", 4 * 1280, 512, 2048)]
    if quick():
        mlp = [("quick-mlp", 256, 64, 256)]
    for label, dtype in DTYPES.items():
        for n in squares:
            emit("matmul", f"{n}x{n}x{n}", "torch-matmul", f"GFLOP/s {label}",
                 gemm_flops(n, n, n, dtype) / 1e9, note=note)
        for case, m, k, n in mlp:
            emit("matmul", f"{case} {m}x{k}x{n}", "torch-matmul", f"GFLOP/s {label}",
                 gemm_flops(m, k, n, dtype) / 1e9, note=note)


if __name__ == "__main__":
    main()
