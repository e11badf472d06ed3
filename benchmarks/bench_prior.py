"""Prior targets: training-step model FLOP rate vs a dense matmul of similar shape
(fp32 and bf16 autocast), and KV-cached sampling vs recomputing the prefix for 256 text + 1,024
image tokens (the paper's sequence at reduced width).

    BENCH_THREADS=2 .venv/bin/python -m benchmarks.bench_prior      (BENCH_QUICK=1: seconds)
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import emit, quick, threads, time_interleaved
from dalle.config import load_params
from dalle.models.config import from_section
from dalle.models.transformer import DalleTransformer, PriorConfig
from dalle.sample import sample_image_tokens
from dalle.train.prior_loop import autocast_for, make_optimizer, model_flops_per_step, prior_loss


def train_rates(batch: int) -> None:
    p = load_params("params.yaml")
    grid = p.data.image_size // 2 ** (p.dvae.group_count - 1)
    model = DalleTransformer(from_section(PriorConfig, p.prior, text_vocab=p.tokenizer.vocab_size,
                                          text_len=p.tokenizer.text_len, image_vocab=p.dvae.vocab_size,
                                          grid=grid))
    opt = make_optimizer(model, p.prior)
    text = torch.randint(0, p.tokenizer.vocab_size, (batch, p.tokenizer.text_len))
    lengths = torch.full((batch,), p.tokenizer.text_len // 2)
    image = torch.randint(0, p.dvae.vocab_size, (batch, grid * grid))
    d, rows = p.prior.d_model, batch * (model.seq_len - 1)
    a, w = torch.randn(rows, d), torch.randn(p.prior.mlp_ratio * d, d)

    def step(precision: str) -> None:
        with autocast_for(precision, torch.device("cpu")):
            loss, _ = prior_loss(model, text, lengths, image)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def matmul(dtype: torch.dtype) -> None:
        (a.to(dtype) @ w.to(dtype).T)

    t = time_interleaved({"fp32": lambda: step("fp32"), "bf16": lambda: step("bf16"),
                          "mm32": lambda: matmul(torch.float32), "mm16": lambda: matmul(torch.bfloat16)},
                         repeats=2 if quick() else 5)
    flops, mm = model_flops_per_step(model, batch), 2.0 * rows * d * w.shape[0]
    case = f"default prior B={batch} L={model.seq_len - 1} d={d}"
    for name, mmk in (("fp32", "mm32"), ("bf16", "mm16")):
        emit("prior_train", case, f"dalle-{name}", "model GFLOP/s", flops / t[name] / 1e9)
        emit("prior_train", case, f"torch-matmul-{name}", "GFLOP/s", mm / t[mmk] / 1e9)
        emit("prior_train", case, f"dalle-{name}", "fraction of matmul rate", (flops / t[name]) / (mm / t[mmk]))


def sampling_speedup(text_len: int, grid: int, d_model: int, batch: int = 1) -> None:
    """KV-cached decoding vs recomputing the whole prefix at every position (target >= 10x for
    1,024 image tokens at the paper's sequence, reduced width): both decode greedily end to end,
    and the tokens must agree. The recompute baseline runs the model's own (auto) attention."""
    torch.manual_seed(0)
    model = DalleTransformer(PriorConfig(text_vocab=512, text_len=text_len, image_vocab=512, grid=grid,
                                         n_layers=4, d_model=d_model, n_heads=4, mlp_ratio=4,
                                         attention="sparse", conv_kernel=11, dropout=0.0,
                                         checkpointing=False, attention_impl="auto"))
    ids, lengths = torch.randint(0, 512, (batch, text_len)), torch.full((batch,), text_len * 3 // 4)
    times, outs = {}, {}
    for cached in (True, False):
        t0 = time.perf_counter()
        outs[cached] = sample_image_tokens(model, ids, lengths, 1, top_k=1, cached=cached, batch_size=batch)
        times[cached] = time.perf_counter() - t0
    assert torch.equal(outs[True], outs[False]), "cached and recomputed greedy decoding disagree"
    case = f"{text_len} text + {grid * grid} image tokens, 4 layers d={d_model}, batch {batch}"
    note = f"{threads()} threads, greedy, end to end"
    emit("sampling", case, "dalle-cached", "tokens/s", batch * grid * grid / times[True], note=note)
    emit("sampling", case, "dalle-recompute", "tokens/s", batch * grid * grid / times[False], note=note)
    emit("sampling", case, "dalle-cached", "speed-up vs recompute", times[False] / times[True], note=note)


def main() -> None:
    torch.set_num_threads(threads())
    train_rates(8 if quick() else 64)
    sampling_speedup(16, 8, 64) if quick() else sampling_speedup(256, 32, 64)


if __name__ == "__main__":
    main()
