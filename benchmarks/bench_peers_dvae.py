"""dVAE: training images/s (forward + ELB loss + backward + Adam step) and encode images/s (argmax
codes, no gradient) of this project's dVAE vs DALLE-pytorch's `DiscreteVAE` at matched size
(and peak RSS), in ONE process, channels-last where ours uses it.

Shapes: `default` = params.yaml (64x64 images, 8x8 grid, 512 codes, the default widths);
`paper-shaped` = 256x256 images, 32x32 grid, the paper's 8192 codes, released layout (4 groups,
max-pool after groups 1-3) at reduced width n_hid 64, one block per group.
DALLE-pytorch's DiscreteVAE gets the same image size, downsampling (3 stride-2 convs), vocabulary
and the hidden width whose parameter count is closest to ours (the note shows both counts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks import peers
from benchmarks.common import emit, peak_rss, quick, threads, time_interleaved


@dataclass(frozen=True)
class DvaeShape:
    name: str
    image_size: int
    vocab: int
    n_hid: int
    n_blk_per_group: int
    batch: int
    group_count: int = 4
    n_init: int = 128
    dec_n_hid: int = 64


def dvae_shapes() -> list[DvaeShape]:
    if quick():
        return [DvaeShape("quick", 32, 64, 16, 1, 4, 4, 16, 16)]
    d = peers.section("dvae")
    return [DvaeShape("default", peers.section("data").image_size, d.vocab_size, d.n_hid, d.n_blk_per_group,
                      d.batch_size, d.group_count, d.n_init, d.dec_n_hid),
            DvaeShape("paper-shaped", 256, 8192, 64, 1, 2, 4, 128, 64)]


def n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def ours(shape: DvaeShape) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(model, loss(images) as train/dvae.py computes it, encode(images) -> argmax codes), channels-last
    as train_dvae runs it (dvae.channels_last: true)."""
    from dalle.models.dvae import DiscreteVAE, DVAEConfig
    from dalle.train.dvae_loss import elb_terms

    model = DiscreteVAE(DVAEConfig(vocab_size=shape.vocab, n_hid=shape.n_hid, n_blk_per_group=shape.n_blk_per_group,
                                   group_count=shape.group_count, n_init=shape.n_init, dec_n_hid=shape.dec_n_hid,
                                   image_size=shape.image_size)).to(memory_format=torch.channels_last)
    return model, (lambda x: elb_terms(model, x, tau=1.0, beta=6.6).loss), model.encode


def dalle_pytorch(shape: DvaeShape, target_params: int):
    from dalle_pytorch import DiscreteVAE

    def make(h: int) -> torch.nn.Module:
        return DiscreteVAE(image_size=shape.image_size, num_layers=shape.group_count - 1, num_tokens=shape.vocab,
                           codebook_dim=512, hidden_dim=h, num_resnet_blocks=shape.n_blk_per_group,
                           kl_div_loss_weight=6.6)

    widths = (16, 32, 64, 128, 256)
    h = min(widths, key=lambda w: abs(n_params(make(w)) - target_params))
    vae = make(h)
    return vae, (lambda x: vae(x, return_loss=True)), vae.get_codebook_indices


def flops_per_image(step_loss: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor],
                    images: torch.Tensor) -> tuple[float, float]:
    """(training FLOPs, encode FLOPs) of one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_loss(images[:1]).backward()
    train = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        encode(images[:1])
    return float(train), float(fc.get_total_flops())


def contenders(shape: DvaeShape, images: torch.Tensor):
    """{impl: (train_step, encode)}, peak RSS per impl, parameter counts, FLOPs per image."""
    peers.preimport()
    built, rss, sizes, flops = {}, {}, {}, {}
    for impl in ("dalle", "dalle-pytorch"):
        try:
            with peak_rss() as mem:
                model, loss, encode = ours(shape) if impl == "dalle" else dalle_pytorch(shape, sizes.get("dalle", 0))
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)

                def step(loss=loss, opt=opt) -> None:
                    loss(images).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                step()
            built[impl], rss[impl], sizes[impl] = (step, encode), mem.delta_mb, n_params(model)
            flops[impl] = flops_per_image(loss, encode, images)
            opt.zero_grad(set_to_none=True)
        except ImportError as exc:
            emit("dvae_train", shape.name, impl, "images/s", None, note=f"unavailable: {exc}")
    return built, rss, sizes, flops


def bench_shape(shape: DvaeShape) -> None:
    images = torch.rand(shape.batch, 3, shape.image_size, shape.image_size).contiguous(memory_format=torch.channels_last)
    built, rss, sizes, flops = contenders(shape, images)
    repeats = 1 if quick() else 3 if shape.image_size <= 64 else 2
    train = time_interleaved({k: v[0] for k, v in built.items()}, repeats=repeats, warmup=0)
    with torch.no_grad():
        enc = time_interleaved({k: (lambda f=v[1]: f(images)) for k, v in built.items()}, repeats=repeats, warmup=1)
    size = f"{shape.image_size}px, {shape.vocab} codes, batch {shape.batch}, {threads()} threads, fp32"
    for impl in built:
        f_train, f_enc = flops[impl]
        note = f"{size}, {sizes[impl] / 1e6:.2f} M params"
        emit("dvae_train", shape.name, impl, "images/s", shape.batch / train[impl], peak_rss_mb=rss[impl],
             note=f"{note}, {f_train / 1e9:.2f} GFLOP/img")
        emit("dvae_train", shape.name, impl, "GFLOP/s", shape.batch * f_train / train[impl] / 1e9,
             note="achieved: FLOPs counted by torch FlopCounterMode; the architectures differ in FLOPs/img")
        emit("dvae_encode", shape.name, impl, "images/s", shape.batch / enc[impl], note=f"{note}, {f_enc / 1e9:.3f} GFLOP/img")
        emit("dvae_encode", shape.name, impl, "GFLOP/s", shape.batch * f_enc / enc[impl] / 1e9, note="achieved")


def main() -> None:
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    for shape in dvae_shapes():
        bench_shape(shape)


if __name__ == "__main__":
    main()
