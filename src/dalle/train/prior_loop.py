"""Pieces of the prior's training step (paper §2.2, §2.4, App. B.2), importable one by one.

The distributed trainer reuses them: `prior_loss`, `lr_at`, `make_optimizer`, `autocast_for`, and
the strategy hooks of `LocalStrategy` (the same names as dalle.distributed.strategy.ShardedStrategy).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from dalle.models.transformer import DalleTransformer
from dalle.train.common import EMA, cosine_anneal, linear_warmup


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decoupled weight decay on weight matrices only, not gains, biases or embeddings (App. B.2)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            wants = isinstance(module, nn.Linear) and name == "weight"
            (decay if wants else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: Any, cfg: Any) -> torch.optim.AdamW:
    """AdamW β = (0.9, 0.96), eps 1e-8, weight decay 4.5e-2 (App. B.2); params: a module or groups."""
    groups = param_groups(params, cfg.weight_decay) if isinstance(params, nn.Module) else params
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def autocast_for(precision: str, device: torch.device) -> ContextManager[Any]:
    """bf16 autocast on CPU, fp16 on GPU (paper §2.4 trains in 16-bit); fp32 = no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" and device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


class LocalStrategy:
    """Single-process default of the strategy hooks the loop calls (see ShardedStrategy)."""

    rank, size, is_chief = 0, 1, True

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.ema: EMA | None = None

    def batch_slice(self, batch_size: int) -> slice:
        return slice(0, batch_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        self.model = model
        return model

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        assert self.model is not None
        return param_groups(self.model, weight_decay)

    def before_forward(self) -> None: ...

    def after_backward(self) -> None: ...

    def clip_grad_norm_(self, max_norm: float) -> float:
        assert self.model is not None
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def mean(self, value: float) -> float:
        return value

    def ema_update(self, decay: float) -> None:
        assert self.model is not None
        if self.ema is None:
            self.ema = EMA(self.model, decay)
        self.ema.decay = decay  # a resumed EMA is rebuilt before the decay is known
        self.ema.update(self.model)

    def full_state_dict(self, model: nn.Module, ema: bool = False) -> dict[str, torch.Tensor]:
        if ema and self.ema is not None:
            return {k: v.clone() for k, v in self.ema.state_dict().items()}
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None
        if state.get("ema"):
            self.ema = EMA(self.model, 0.0)
            self.ema.load_state_dict(state["ema"])

    def agree_min(self, value: int) -> int:
        return value


def model_flops_per_step(model: DalleTransformer, batch: int) -> float:
    """Training FLOPs (fwd + bwd = 3x fwd) of the dense matmuls + attention scores, for MFU."""
    seq = model.seq_len - 1
    d = model.head.in_features
    n_block = sum(p.numel() for n, p in model.blocks.named_parameters() if n.endswith("weight") and p.dim() == 2)
    fwd = 2 * batch * seq * (n_block + model.head.weight.numel()) + 4 * batch * len(model.blocks) * seq * seq * d
    return 3.0 * fwd


def finite(x: float) -> bool:
    return math.isfinite(x)
