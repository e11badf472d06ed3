"""Parameters and Adam moments stored in 16-bit (paper §2.4: "most parameters, Adam moments, and
activations are stored in 16-bit precision"), the scheme of `prior.store_16bit`:

* which parameters: the weight matrices of the resblocks (`to_16bit`), 98% of the paper's 12B
  model; embeddings, the output head, gains and biases stay fp32, so the identity path starts
  and stays in fp32 (fig. 4) and the logits are computed in fp32;
* their gradients are 16-bit too (autograd gives a parameter's gradient its dtype), in the units
  of the block's gradient scale: they are never unscaled in 16-bit (an fp16 gradient divided by
  its scale would underflow, the problem the scales solve); `ResblockScaler.unscale_` records a
  factor 1/scale per such parameter instead, clipping multiplies the factors, and the optimiser
  reads grad.float() * factor;
* the optimiser (`HalfAdamW`): AdamW with the moments m and v stored in bf16 (fp32's exponent
  range: v ~ g² cannot underflow) and the step computed in fp32 one tensor at a time; the master
  state is a 16-bit compensation c per parameter: the weight is the pair w = p + c, updated in
  fp32 and split again (p = round16(w), c = round16(w - p)), so updates far below one 16-bit ulp
  of p (late in a decayed schedule) accumulate instead of being rounded away.

Bytes per 16-bit parameter between steps: p 2 + c 2 + m 2 + v 2 + grad 2 = 10, against 16 for
fp32 parameters with fp32 AdamW (the EMA, fp32 in both, is counted apart).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

Factors = Mapping[nn.Parameter, float]  # true gradient = p.grad.float() * factor


def to_16bit(blocks: Iterable[nn.Module], dtype: torch.dtype) -> list[nn.Parameter]:
    """Store the weight matrices (ndim >= 2) of `blocks` in `dtype`, in place; returns them."""
    out = []
    for block in blocks:
        for p in block.parameters():
            if p.ndim >= 2:
                p.data = p.data.to(dtype)
                out.append(p)
    return out


def is_16bit(p: torch.Tensor) -> bool:
    return p.dtype in (torch.float16, torch.bfloat16)


def true_grad(p: nn.Parameter, factors: Optional[Factors]) -> torch.Tensor:
    """The gradient of p in true units, fp32 [same shape as p]."""
    assert p.grad is not None
    g = p.grad.float()
    f = factors.get(p, 1.0) if factors else 1.0
    return g * f if f != 1.0 else g


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], factors: dict[nn.Parameter, float],
                    max_norm: float) -> float:
    """Global norm of the true gradients (fp32 grads in place, 16-bit grads through `factors`);
    above max_norm, fp32 grads are scaled in place and the 16-bit ones' factors multiplied."""
    params = [p for p in params if p.grad is not None]
    sq = sum(float(true_grad(p, factors).double().pow(2).sum()) for p in params)
    norm = math.sqrt(sq)
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            if is_16bit(p.grad):
                factors[p] = factors.get(p, 1.0) * coef
            else:
                p.grad.mul_(coef)
    return norm


class HalfAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as torch.optim.AdamW) for fp32 and
    16-bit parameters: fp32 ones keep fp32 moments; 16-bit ones bf16 moments and a 16-bit
    compensation (see the module docstring). `step(factors)` reads 16-bit grads times factors."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _state(self, p: nn.Parameter) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            moment = torch.bfloat16 if is_16bit(p) else torch.float32
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment)
            if is_16bit(p):
                state["comp"] = torch.zeros_like(p)  # w = p + comp (the master value)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None, factors: Optional[Factors] = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                st["step"] += 1
                t = float(st["step"])
                g = true_grad(p, factors)  # fp32 [p.shape]
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                w = p.float() + st["comp"].float() if "comp" in st else p.float()
                w.mul_(1 - group["lr"] * group["weight_decay"])
                w.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))
                p.copy_(w)  # rounds to p's dtype
                if "comp" in st:
                    st["comp"].copy_(w - p.float())


def state_bytes(params: Iterable[nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held between steps by `params`, their gradients and their optimiser state."""
    params = list(params)
    out = {"params": sum(p.numel() * p.element_size() for p in params),
           "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": sum(t.numel() * t.element_size() for p in params
                            for t in opt.state.get(p, {}).values() if torch.is_tensor(t) and t.ndim)}
    out["numel"] = sum(p.numel() for p in params)
    return out
