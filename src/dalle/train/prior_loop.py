"""Pieces of the prior's training step (paper §2.2, §2.4, App. B.2), importable one by one:
`prior_loss`, `lr_at`, `make_optimizer`, `autocast_for`, `model_flops_per_step`."""
from __future__ import annotations

import math
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from dalle.models.transformer import DalleTransformer
from dalle.precision import autocast
from dalle.train.common import cosine_anneal, linear_warmup, param_groups


def prior_loss(model: nn.Module, text_ids: torch.Tensor, text_lengths: torch.Tensor,
               image_tokens: torch.Tensor, weights: tuple[float, float] = (1 / 8, 7 / 8)
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy: text x 1/8 + image x 7/8, each normalised by its token count (§2.2).

    Text targets are the caption's own tokens 1..len-1 (padding positions are not predicted);
    image targets are all grid² tokens (the first one from the last text position).
    """
    text_logits, image_logits = model(text_ids, text_lengths, image_tokens)  # [B, T-1, Vt], [B, N, Vi]
    tgt = text_ids[:, 1:]  # [B, T-1]
    real = torch.arange(1, text_ids.shape[1], device=tgt.device)[None] < text_lengths[:, None]
    tgt = torch.where(real, tgt, torch.full_like(tgt, -100))
    n_text = int(real.sum())
    with torch.autocast(image_logits.device.type, enabled=False):  # the loss in fp32 (§2.4)
        loss_text = (F.cross_entropy(text_logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
                     if n_text else text_logits.sum() * 0.0)
        loss_image = F.cross_entropy(image_logits.float().flatten(0, 1), image_tokens.flatten())
    loss = weights[0] * loss_text + weights[1] * loss_image
    return loss, {"loss_text": float(loss_text.detach()), "loss_image": float(loss_image.detach()),
                  "loss": float(loss.detach()),
                  "text_tokens": float(n_text), "image_tokens": float(image_tokens.numel())}


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to lr * lr_final_frac (App. B.2: 32x)."""
    decay = cosine_anneal(max(0, step - cfg.warmup_steps), cfg.lr, cfg.lr * cfg.lr_final_frac,
                          max(1, cfg.steps - cfg.warmup_steps))
    return decay * linear_warmup(step, cfg.warmup_steps)


def make_optimizer(params: Any, cfg: Any) -> torch.optim.AdamW:
    """AdamW β = (0.9, 0.96), eps 1e-8, weight decay 4.5e-2 (App. B.2); params: a module (the one
    weight-decay rule of dalle.train.common picks its groups) or groups."""
    groups = param_groups(params, cfg.weight_decay) if isinstance(params, nn.Module) else params
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def autocast_for(precision: str, device: torch.device) -> ContextManager[Any]:
    """A resolved precision's autocast (dalle.precision.autocast): bf16, fp16 on GPU (paper §2.4
    trains in 16-bit), fp32 = none. The prior's logits and loss stay fp32 under it."""
    return autocast(precision, device)


def model_flops_per_step(model: DalleTransformer, batch: int) -> float:
    """Training FLOPs (fwd + bwd = 3x fwd) of the dense matmuls + attention scores, for MFU."""
    seq = model.seq_len - 1
    d = model.head.in_features
    n_block = sum(p.numel() for n, p in model.blocks.named_parameters() if n.endswith("weight") and p.dim() == 2)
    fwd = 2 * batch * seq * (n_block + model.head.weight.numel()) + 4 * batch * len(model.blocks) * seq * seq * d
    return 3.0 * fwd


def finite(x: float) -> bool:
    return math.isfinite(x)
