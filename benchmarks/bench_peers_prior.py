"""Prior training throughput (tokens/s, forward + backward + AdamW step), side by side in ONE process:
this project's prior vs DALLE-pytorch 1.6.6 vs Hugging Face GPT-2 at the same shape, plus MFU
against torch's own matmul ceiling measured in the same run (and peak RSS).

All contenders train in fp32: on this CPU (AVX-512 BF16, no AMX) bf16 GEMMs are slower than fp32
(bench_matmul), so fp32 is every contender's fastest setting; `dalle-bf16` shows the autocast cost.
"""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks import peers
from benchmarks.common import emit, peak_rss, quick, threads, time_interleaved

StepFn = Callable[[], None]


def ours_loss(model: torch.nn.Module, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """This project's training loss, `dalle.train.prior_loop.prior_loss` (paper §2.2: per-kind
    cross-entropy, text x 1/8 + image x 7/8); captions fill text_len."""
    from dalle.train.prior_loop import prior_loss

    lengths = torch.full((text.shape[0],), text.shape[1], dtype=torch.long)
    return prior_loss(model, text, lengths, image)[0]


def make_step(impl: str, model: torch.nn.Module, shape: peers.Shape, text: torch.Tensor,
              image: torch.Tensor, autocast: bool = False) -> StepFn:
    """One optimiser step of `impl` on the fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.cat([text, image + shape.text_vocab], dim=1)  # GPT-2: one flat vocabulary

    def loss() -> torch.Tensor:
        if impl == "dalle-pytorch":
            return model(text, image, return_loss=True)
        if impl == "gpt2-hf":
            return model(input_ids=ids, labels=ids).loss
        return ours_loss(model, text, image)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def contenders(shape: peers.Shape, text: torch.Tensor, image: torch.Tensor
               ) -> tuple[dict[str, StepFn], dict[str, float]]:
    """Build every contender (skipping, with an n/a row, those not installed); returns the step
    functions and the peak RSS each added while building and taking its first step (MiB)."""
    builders = {"dalle": (peers.build_ours, False), "dalle-bf16": (peers.build_ours, True),
                "dalle-pytorch": (peers.build_dalle_pytorch, False), "gpt2-hf": (peers.build_gpt2, False)}
    peers.preimport()
    steps, rss = {}, {}
    for impl, (build, autocast) in builders.items():
        try:
            with peak_rss() as mem:
                model = build(shape).train()
                steps[impl] = make_step(impl.split("-bf16")[0], model, shape, text, image, autocast)
                steps[impl]()  # first step: allocations, lazy init (also the warm-up)
            rss[impl] = mem.delta_mb
        except ImportError as exc:
            emit("prior_train", shape.name, impl, "tokens/s", None, note=f"unavailable: {exc}")
    return steps, rss


def bench_shape(shape: peers.Shape) -> None:
    text, image = peers.random_batch(shape, shape.batch)
    steps, rss = contenders(shape, text, image)
    n = 256 if quick() else 2048  # the ceiling, timed interleaved with the steps (same noise)
    a, b = torch.randn(n, n), torch.randn(n, n)
    steps["torch-matmul"] = lambda: torch.mm(a, b)
    times = time_interleaved(steps, repeats=1 if quick() else 3, warmup=0)
    ceiling = 2.0 * n**3 / times.pop("torch-matmul")
    emit("prior_train", shape.name, "torch-matmul", "GFLOP/s fp32", ceiling / 1e9,
         note=f"{n}x{n}x{n} GEMM timed between the steps: the MFU denominator")
    tokens = shape.batch * shape.seq_len
    setting = f"batch {shape.batch} x {shape.seq_len} tokens, {threads()} threads"
    for impl, seconds in times.items():
        dtype = "bf16 autocast" if impl.endswith("bf16") else "fp32"
        emit("prior_train", shape.name, impl, "tokens/s", tokens / seconds, peak_rss_mb=rss[impl],
             note=f"{setting}, {dtype}")
        mfu = tokens / seconds * shape.train_flops_per_token() / ceiling
        emit("prior_train", shape.name, impl, "MFU", mfu,
             note=f"model FLOPs / fp32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s")


def main() -> None:
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    for shape in peers.shapes():
        bench_shape(shape)


if __name__ == "__main__":
    main()
