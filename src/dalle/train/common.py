"""Shared training-loop pieces: EMA of weights (iterate averaging), schedules, RNG state.

Paper §2.1 / §2.2: both stages use Adam "with exponentially weighted iterate averaging"; the EMA
weights are what is saved and used. Schedules are functions of the step so that a resumed run
continues exactly where it stopped.
"""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn


class EMA:
    """Exponentially weighted iterate averaging: ema <- d * ema + (1 - d) * param."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadows, values = [], []
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                shadows.append(self.shadow[key])
                values.append(value.detach().float())
            else:
                self.shadow[key].copy_(value)
        if shadows:  # one fused call instead of one lerp per tensor (a tiny dVAE has ~70 of them)
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (in its own dtypes)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def cosine_anneal(step: int, start: float, end: float, length: int) -> float:
    """Cosine from `start` (step 0) to `end` (step >= length); paper App. A.2 uses cosine decays."""
    if length <= 0 or step >= length:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / length))


def linear_warmup(step: int, warmup: int) -> float:
    """Multiplier ramping linearly 0 -> 1 over `warmup` steps (paper App. B.2: 5000 updates)."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def rng_state() -> dict[str, Any]:
    """Every RNG a training loop touches, as tensors/JSON for a safetensors checkpoint."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": repr(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """params `device`: "auto" -> cuda when torch sees a GPU, else cpu; "cuda" without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from dalle.errors import ConfigError

        raise ConfigError("device: cuda was asked for but torch sees no GPU (use auto or cpu)")
    return torch.device(name)
