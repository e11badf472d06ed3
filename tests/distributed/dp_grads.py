"""One rank of tests/distributed/test_data_parallel.py's gradient check (run by horovodrun).

Usage: dp_grads.py OUT_JSON. Every rank computes, for the contrastive model and the dVAE, the
gradient one process gets on a whole global batch of 8 and the data-parallel gradient (its 4 rows,
the batch-level terms through gather_rows, the ranks' gradients averaged); rank 0 writes, per
model, the largest |difference| and the largest |gradient| to OUT_JSON.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from dalle.distributed.data_parallel import data_parallel
from dalle.models.clip import ClipConfig, ContrastiveModel, contrastive_loss
from dalle.models.dvae import DiscreteVAE
from dalle.train.dvae_loss import BatchPart, elb_terms
from tests.helpers import dvae_config

B = 8


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def compare(strategy: Any, model: torch.nn.Module, loss_full: Callable[[Any], torch.Tensor],
            loss_part: Callable[[Any, Any], torch.Tensor]) -> dict[str, float]:
    ref = copy.deepcopy(model)
    loss_full(ref).backward()
    strategy.wrap(model)
    loss_part(model, strategy).backward()
    strategy.after_backward()
    want, got = grads(ref), grads(model)
    return {"max_diff": float((want - got).abs().max()), "max_grad": float(want.abs().max())}


def clip_case(strategy: Any) -> dict[str, float]:
    torch.manual_seed(0)
    model = ContrastiveModel(ClipConfig(image_size=16, vocab_size=50, text_len=6, embed_dim=16,
                                        image_width=8, text_width=16, text_layers=1, text_heads=2,
                                        temperature_init=0.07))
    images, ids = torch.rand(B, 3, 16, 16), torch.randint(0, 50, (B, 6))
    lengths = torch.randint(1, 7, (B,))

    def full(m: ContrastiveModel) -> torch.Tensor:
        return contrastive_loss(m.encode_image(images), m.encode_text(ids, lengths), m.scale())

    def part(m: ContrastiveModel, strategy: Any) -> torch.Tensor:
        rows = strategy.batch_slice(B)
        img = strategy.gather_rows(m.encode_image(images[rows]), "img")
        txt = strategy.gather_rows(m.encode_text(ids[rows], lengths[rows]), "txt")
        return contrastive_loss(img, txt, m.scale())

    return compare(strategy, model, full, part)


def dvae_case(strategy: Any) -> dict[str, float]:
    torch.manual_seed(0)
    model = DiscreteVAE(dvae_config(vocab_size=32, n_hid=8, group_count=2, n_init=8, dec_n_hid=8,
                                    image_size=16))
    images = torch.rand(B, 3, 16, 16)

    def full(m: DiscreteVAE) -> torch.Tensor:
        torch.manual_seed(1)  # the gumbel noise
        return elb_terms(m, images, 0.5, 0.3, usage_weight=100.0).loss

    def part(m: DiscreteVAE, strategy: Any) -> torch.Tensor:
        torch.manual_seed(1)
        rows = strategy.batch_slice(B)
        split = BatchPart(rows, B, strategy.gather_rows)
        return elb_terms(m, images[rows], 0.5, 0.3, usage_weight=100.0, part=split).loss

    return compare(strategy, model, full, part)


def main(out: Path) -> None:
    strategy = data_parallel()
    result = {"clip": clip_case(strategy), "dvae": dvae_case(strategy)}
    if strategy.is_chief:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
