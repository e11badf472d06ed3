"""Structured vs boolean-masked sparse attention of the prior ("make it fast").

`masked` feeds the whole [T+N, T+N] stream mask to the fused CPU flash kernel, which cannot skip
masked-out blocks; `structured` (dalle.models.attention.structured_attention) runs the text block
and each image row / column / conv window as fused calls merged by log-sum-exp. Both are exact;
this times one layer's attention (forward + backward) per layer kind and the whole training step,
at the embedded default and the paper-shaped config, interleaved in one process.

    BENCH_THREADS=1 .venv/bin/python -m benchmarks.bench_attention      (BENCH_QUICK=1: seconds)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import peers
from benchmarks.bench_peers_prior import make_step
from benchmarks.common import emit, quick, threads, time_interleaved
from dalle.models.attention import block_layout, stream_mask, structured_attention

IMPLS = ("masked", "structured")


def layer_fns(shape: peers.Shape, kind: str, batch: int) -> dict[str, Callable[[], None]]:
    """Forward + backward of one layer's attention over the training stream (T + N - 1 positions)."""
    t, length, dh = shape.text_len, shape.seq_len - 1, shape.d_model // shape.n_heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, shape.n_heads, length, dh, generator=g).requires_grad_() for _ in range(3))
    up = torch.randn(batch, shape.n_heads, length, dh, generator=g)
    mask = stream_mask(kind, t, shape.grid, shape.conv_kernel)[:length, :length]
    lay = block_layout(kind, t, shape.grid, shape.grid, shape.conv_kernel, "cpu")

    def run(structured: bool) -> None:
        y = (structured_attention(q, k, v, lay) if structured
             else F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        y.backward(up)
        q.grad = k.grad = v.grad = None

    return {"masked": lambda: run(False), "structured": lambda: run(True)}


def step_fns(shape: peers.Shape) -> dict[str, Callable[[], None]]:
    """One fp32 training step (forward, loss, backward, AdamW) of the prior with each impl."""
    text, image = peers.random_batch(shape, shape.batch)
    fns = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        model = peers.build_ours(shape).train()
        model.attention_impl = impl  # type: ignore[assignment]
        fns[impl] = make_step("dalle", model, shape, text, image)
    return fns


def report(case: str, times: dict[str, float], metric: str, value: Callable[[float], float],
           higher: bool, note: str) -> None:
    for impl, seconds in times.items():
        emit("attention", case, f"dalle-{impl}", metric, value(seconds), higher_is_better=higher, note=note)
    emit("attention", case, "dalle-structured", "speed-up vs masked", times["masked"] / times["structured"], note=note)


def main() -> None:
    torch.set_num_threads(threads())
    repeats = 1 if quick() else 3
    for shape in peers.shapes():
        layer_batch = min(shape.batch, 8)
        for kind in ("row", "column", "conv"):
            times = time_interleaved(layer_fns(shape, kind, layer_batch), repeats=repeats + 2)
            note = f"one {kind} layer fwd+bwd, [{layer_batch}, {shape.n_heads}, {shape.seq_len - 1}, " \
                   f"{shape.d_model // shape.n_heads}], {threads()} threads"
            report(f"{shape.name} {kind}", times, "ms", lambda s: s * 1e3, False, note)
        times = time_interleaved(step_fns(shape), repeats=repeats)
        tokens = shape.batch * shape.seq_len
        report(f"{shape.name} train step", times, "tokens/s", lambda s: tokens / s, True,
               f"batch {shape.batch} x {shape.seq_len}, d {shape.d_model}, {shape.n_layers} layers, "
               f"fp32, {threads()} threads")


if __name__ == "__main__":
    main()
