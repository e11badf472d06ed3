"""Sampling: seconds to generate all image tokens (1,024 at the paper shape) for a batch of 8
captions, in ONE process:

* `dalle`: this project's KV-cached sampler (`dalle.sample.sample_image_tokens`);
* `gpt2-hf`: GPT-2 `generate(use_cache=True, do_sample=True, top_k=...)` at the same shape;
* `dalle-pytorch`: `DALLE.generate_images(text, filter_thres=0.9)` exactly as its generate.py CLI
  calls it (no cache: its sparse axial/conv attention layers do not support one, so every step
  re-runs the whole prefix). Where the image has more than 256 tokens a full run takes hours on
  2 cores, so the per-step time (its forward on the prefix + top-k + gumbel sample, the body of its
  loop) is timed at 6 prefix lengths and the least-squares quadratic is summed over all steps.
All keep the top 10% of the logits (DALLE-pytorch's filter_thres 0.9) and sample at temperature 1.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from benchmarks import peers
from benchmarks.common import emit, peak_rss, quick, threads, time_interleaved

N_CAPTIONS = 8
TOP_FRACTION = 0.1  # DALLE-pytorch generate.py: --top_k 0.9 = keep the top 10% of logits
MEASURE_MAX_TOKENS = 256  # above this, DALLE-pytorch's uncached time is extrapolated


def ours_sampler(model: torch.nn.Module, shape: peers.Shape, text: torch.Tensor) -> Callable[[], object]:
    from dalle.sample import sample_image_tokens

    k = max(1, int(TOP_FRACTION * shape.image_vocab))
    lengths = torch.full((text.shape[0],), text.shape[1], dtype=torch.long)
    return lambda: sample_image_tokens(model, text, lengths, top_k=k, temperature=1.0, batch_size=text.shape[0])


def gpt2_sampler(model: torch.nn.Module, shape: peers.Shape, text: torch.Tensor) -> Callable[[], object]:
    k = max(1, int(TOP_FRACTION * (shape.text_vocab + shape.image_vocab)))
    return lambda: model.generate(input_ids=text, attention_mask=torch.ones_like(text),
                                  max_new_tokens=shape.image_len, min_new_tokens=shape.image_len,
                                  do_sample=True, top_k=k, temperature=1.0, use_cache=True)


def dalle_pytorch_step(model: torch.nn.Module, text: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """One iteration of DALLE.generate_images' loop (dalle_pytorch 1.6.6) at a given image prefix."""
    from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k

    logits = model(text, prefix)[:, -1, :]
    return gumbel_sample(top_k(logits, thres=1 - TOP_FRACTION), temperature=1.0, dim=-1)


def dalle_pytorch_extrapolated(model: torch.nn.Module, shape: peers.Shape, text: torch.Tensor,
                               image: torch.Tensor, repeats: int, points: int = 6) -> float:
    """Seconds for all image_len uncached steps: the step time t(n) is timed at `points` prefix
    lengths n spread over 0..image_len-1, a quadratic a + b n + c n^2 is fitted (least squares; the
    attention part of an uncached step grows with n^2) and summed over n = 0..image_len-1."""
    n_points = sorted({round(i * (shape.image_len - 1) / (points - 1)) for i in range(points)})
    fns = {n: (lambda n=n: dalle_pytorch_step(model, text, image[:, :n])) for n in n_points}
    with torch.no_grad():
        fns[n_points[0]]()  # warm-up
        t = time_interleaved(fns, repeats=repeats, warmup=0)
    x = torch.tensor(n_points, dtype=torch.float64)
    y = torch.tensor([t[n] for n in n_points], dtype=torch.float64)
    coef = torch.linalg.lstsq(torch.stack([x**0, x, x**2], 1), y[:, None]).solution[:, 0]
    n = torch.arange(shape.image_len, dtype=torch.float64)
    return float((coef[0] + coef[1] * n + coef[2] * n**2).sum())


def build(shape: peers.Shape, text: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The samplers of the installed contenders (an n/a row for each one missing)."""
    peers.preimport()
    makers = {"dalle": (peers.build_ours, ours_sampler), "gpt2-hf": (peers.build_gpt2, gpt2_sampler)}
    fns = {}
    for impl, (build_model, sampler) in makers.items():
        try:
            fns[impl] = sampler(build_model(shape).eval(), shape, text)
        except ImportError as exc:
            emit("sampling", shape.name, impl, "s", None, higher_is_better=False, note=f"unavailable: {exc}")
    return fns


def timed_with_rss(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per generation (contenders alternated) and the largest peak-RSS increase seen
    during one generation (KV cache, logits, activations)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    rss = {k: 0.0 for k in fns}
    for _ in range(repeats):
        for impl, fn in fns.items():
            with peak_rss() as mem, torch.no_grad():
                t0 = time.perf_counter()
                fn()
                times[impl].append(time.perf_counter() - t0)
            rss[impl] = max(rss[impl], mem.delta_mb)
    return {k: statistics.median(v) for k, v in times.items()}, rss


def bench_dalle_pytorch(shape: peers.Shape, text: torch.Tensor, image: torch.Tensor, setting: str) -> None:
    try:
        with peak_rss() as mem:
            model = peers.build_dalle_pytorch(shape).eval()
            if shape.image_len <= MEASURE_MAX_TOKENS:
                with torch.no_grad():
                    seconds = time_interleaved({"g": lambda: model.generate_images(text, filter_thres=1 - TOP_FRACTION)},
                                               repeats=1, warmup=0)["g"]
                how = "generate_images timed end to end (incl. its VAE decode)"
            else:
                seconds = dalle_pytorch_extrapolated(model, shape, text, image, repeats=1)
                how = "no cache; 6 step lengths timed, fitted quadratic summed over all steps"
        emit("sampling", shape.name, "dalle-pytorch", "s", seconds, higher_is_better=False,
             peak_rss_mb=mem.delta_mb, note=f"{setting}, {how}")
    except ImportError as exc:
        emit("sampling", shape.name, "dalle-pytorch", "s", None, higher_is_better=False, note=f"unavailable: {exc}")


def bench_shape(shape: peers.Shape) -> None:
    text, image = peers.random_batch(shape, N_CAPTIONS)
    fns = build(shape, text)
    small = shape.image_len <= MEASURE_MAX_TOKENS
    if small:  # warm-up; a paper-shaped generation is long enough that one-time costs vanish
        with torch.no_grad():
            for fn in fns.values():
                fn()
    times, rss = timed_with_rss(fns, repeats=3 if small and not quick() else 1)
    setting = f"{N_CAPTIONS} captions x {shape.image_len} image tokens, top {TOP_FRACTION:.0%}, {threads()} threads"
    for impl, seconds in times.items():
        emit("sampling", shape.name, impl, "s", seconds, higher_is_better=False, peak_rss_mb=rss[impl],
             note=f"{setting}, KV cache")
    bench_dalle_pytorch(shape, text, image, setting)


def main() -> None:
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    for shape in peers.shapes():
        bench_shape(shape)


if __name__ == "__main__":
    main()
