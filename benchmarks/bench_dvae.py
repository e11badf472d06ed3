"""dVAE throughput: training images/s and encode (argmax tokens) images/s.

Cases: `default` = params.yaml's `dvae` section at data.image_size; `paper-shaped` = the released
configuration (n_hid 256, 2 blocks/group, 8192 codes) on 256x256 images -> 32x32 grid.
Run: `python -m benchmarks.bench_dvae` (BENCH_QUICK=1 shrinks it; BENCH_THREADS pins threads).
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import emit, peak_rss, quick, threads, time_interleaved

PAPER = dict(vocab_size=8192, n_hid=256, n_blk_per_group=2, group_count=4, n_init=128,
             dec_n_hid=256, image_size=256)


def _default_config() -> tuple[dict[str, Any], int]:
    from dalle.config import load_params
    from dalle.models.config import as_dict, from_section
    from dalle.models.dvae import DVAEConfig

    params = load_params("params.yaml")
    config = from_section(DVAEConfig, params.dvae, image_size=params.data.image_size)
    return as_dict(config), params.dvae.batch_size


def bench(case: str, config: dict[str, Any], train_batch: int, encode_batch: int) -> None:
    from dalle.models.dvae import DiscreteVAE, DVAEConfig
    from dalle.train.dvae_loss import elb_terms

    fmt = torch.channels_last
    model = DiscreteVAE(DVAEConfig(**config)).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = config["image_size"]
    x_train = torch.rand(train_batch, 3, size, size).contiguous(memory_format=fmt)
    x_enc = torch.rand(encode_batch, 3, size, size).contiguous(memory_format=fmt)

    def train_step() -> None:
        loss = elb_terms(model, x_train, tau=1.0, beta=6.6).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def encode() -> None:
        with torch.no_grad():
            model.encode(x_enc)

    repeats = 2 if quick() or case == "paper-shaped" else 5
    with peak_rss() as rss:
        t_train = time_interleaved({"dalle": train_step}, repeats=repeats, warmup=1)["dalle"]
    note = f"batch {train_batch}, {size}x{size}, {torch.get_num_threads()} threads, channels_last"
    emit("dvae_train", case, "dalle", "images/s", train_batch / t_train, peak_rss_mb=rss.peak_mb, note=note)
    with peak_rss() as rss:
        t_enc = time_interleaved({"dalle": encode}, repeats=repeats, warmup=1)["dalle"]
    note = f"batch {encode_batch}, argmax, {torch.get_num_threads()} threads"
    emit("dvae_encode", case, "dalle", "images/s", encode_batch / t_enc, peak_rss_mb=rss.peak_mb, note=note)


def main() -> None:
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    config, batch = _default_config()
    bench("default", config, 8 if quick() else batch, 32 if quick() else 256)
    if quick():
        bench("paper-shaped", {**PAPER, "image_size": 32, "n_hid": 64, "dec_n_hid": 64}, 1, 1)
    else:
        bench("paper-shaped", PAPER, 1, 2)


if __name__ == "__main__":
    main()
