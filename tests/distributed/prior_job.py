"""A few training steps of the real prior (dalle.models.transformer) with per-resblock gradient
scaling, AdamW param groups and the §2.2 loss; with a strategy (sharded) or without (reference)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from dalle.models.transformer import DalleTransformer, PriorConfig
from dalle.train.grad_scale import ResblockScaler
from dalle.train.common import param_groups
from dalle.train.prior_loop import prior_loss

BATCH = 8


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    text = torch.randint(0, 50, (BATCH, 6), generator=g)  # [B, T]
    lengths = torch.full((BATCH,), 5)  # equal lengths: per-rank text means = the global mean
    image = torch.randint(0, 40, (BATCH, 16), generator=g)  # [B, grid²]
    return text, lengths, image


def run_prior(strategy: Optional[Any], steps: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = DalleTransformer(PriorConfig(text_vocab=50, text_len=6, image_vocab=40, grid=4, n_layers=3, d_model=32,
                                         n_heads=4, mlp_ratio=4, attention="sparse", conv_kernel=11,
                                         dropout=0.0, checkpointing=True, attention_impl="auto"))
    model.train()
    if strategy is not None:
        strategy.wrap(model)
    scaler = ResblockScaler(model.blocks, 1024.0, 3)
    groups = strategy.param_groups(0.1) if strategy else param_groups(model, 0.1)
    opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        text, lengths, image = batch(step)
        sl = strategy.batch_slice(BATCH) if strategy else slice(0, BATCH)
        if strategy:
            strategy.before_forward()
        loss, _ = prior_loss(model, text[sl], lengths[sl], image[sl])
        loss.backward()
        if strategy:
            strategy.after_backward()
        ok = scaler.unscale_()
        if strategy:
            strategy.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler.update() and ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(strategy.mean(loss.item()) if strategy else loss.item())
    return {"loss": losses, "scales": [s.scale for s in scaler.states]}
