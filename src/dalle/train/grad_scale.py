"""Per-resblock gradient scaling (paper §2.4, fig. 4, App. D).

A single loss scale underflows the gradients of the late resblocks or overflows the early ones in
16-bit, so every resblock gets its own scale s: the activation gradient entering the resblock's
branch is multiplied by s, the gradient leaving it is divided by s, non-finite values are set to
zero (and recorded), and only then added to the identity path in fp32. The branch's parameter
gradients are in s-scaled units until `unscale_` divides them (fp32 gradients, in place) or
records the factor 1/s for the optimiser to apply in fp32 (16-bit gradients of 16-bit stored
parameters, `dalle.train.half`: unscaling them in 16-bit would underflow). A block's scale halves
after a non-finite event and doubles after `growth_interval` clean steps; a step with any
non-finite gradient is skipped by the loop.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


class BlockScale:
    """Scale and non-finite flag of one resblock (not a parameter or buffer: a plain attribute).
    Put on a resblock's `grad_scale`, it computes x + branch(x) with the branch in its scale."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)
        self.bad = torch.zeros((), dtype=torch.bool)  # any non-finite gradient since last update
        self.clean_steps = 0

    def __call__(self, x: torch.Tensor, branch: Any, *args: Any) -> torch.Tensor:
        return scaled_branch(branch, x, self, *args)


class _Exit(torch.autograd.Function):
    """Forward identity at the branch output; backward multiplies the incoming gradient by s."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: BlockScale) -> torch.Tensor:
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.state.scale, None


class _Enter(torch.autograd.Function):
    """Forward identity at the branch input; backward divides by s and zeroes non-finite values."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: BlockScale) -> torch.Tensor:
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = grad.float() / ctx.state.scale  # back to true units, fp32 (paper App. D)
        finite = torch.isfinite(g)
        ctx.state.bad = ctx.state.bad | ~finite.all()
        return torch.where(finite, g, torch.zeros_like(g)).to(grad.dtype), None


def scaled_branch(branch_out_fn: Any, x: torch.Tensor, state: BlockScale | None, *args: Any) -> torch.Tensor:
    """x + branch(x) with the branch's gradient in its own scale (identity when state is None)."""
    if state is None:
        return x + branch_out_fn(x, *args)
    inner = _Enter.apply(x, state)
    return x + _Exit.apply(branch_out_fn(inner, *args), state)


class ResblockScaler:
    """Owns the BlockScale of every resblock in `blocks` (each gets attribute `grad_scale`)."""

    def __init__(self, blocks: Iterable[nn.Module], init_scale: float, growth_interval: int) -> None:
        self.blocks = list(blocks)
        self.growth_interval = growth_interval
        self.states = [BlockScale(init_scale) for _ in self.blocks]
        for block, state in zip(self.blocks, self.states):
            block.grad_scale = state  # type: ignore[assignment]
        self.skipped = 0
        self.factors: dict[nn.Parameter, float] = {}  # 16-bit grads: true grad = grad.float() * factor

    @torch.no_grad()
    def unscale_(self) -> bool:
        """Divide each block's fp32 parameter gradients by its scale (16-bit ones: record the factor
        1/scale in `factors`); True when every gradient is finite."""
        ok = True
        self.factors = {}
        for block, state in zip(self.blocks, self.states):
            for p in block.parameters():
                if p.grad is not None:
                    if p.grad.dtype == torch.float32:
                        p.grad.div_(state.scale)
                    else:
                        self.factors[p] = 1.0 / state.scale
                    if not bool(torch.isfinite(p.grad).all()):
                        state.bad = torch.ones((), dtype=torch.bool)
            ok = ok and not bool(state.bad)
        return ok

    def update(self) -> bool:
        """Back off (halve) blocks that saw non-finite values, grow clean ones; True = step is clean."""
        clean = not any(bool(s.bad) for s in self.states)
        for state in self.states:
            if bool(state.bad):
                state.scale, state.clean_steps = max(state.scale / 2.0, 2.0 ** -24), 0
            else:
                state.clean_steps += 1
                if state.clean_steps >= self.growth_interval:
                    state.scale, state.clean_steps = min(state.scale * 2.0, 2.0 ** 24), 0
            state.bad = torch.zeros((), dtype=torch.bool)
        if not clean:
            self.skipped += 1
        return clean

    def stats(self) -> dict[str, float]:
        scales = torch.tensor([s.scale for s in self.states])
        return {"grad_scale_min": float(scales.min()), "grad_scale_max": float(scales.max()),
                "grad_scale_mean_log2": float(scales.log2().mean()), "skipped_steps": float(self.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"scales": [s.scale for s in self.states], "clean": [s.clean_steps for s in self.states],
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, scale, clean in zip(self.states, state["scales"], state["clean"]):
            s.scale, s.clean_steps = float(scale), int(clean)
        self.skipped = int(state["skipped"])
