"""Shared training pieces: EMA of weights (iterate averaging), schedules, RNG state, devices, the
one weight-decay rule, and the single-process strategy every trainer plugs into the loop.

Paper §2.1 / §2.2: both stages use Adam "with exponentially weighted iterate averaging"; the EMA
weights are what is saved and used. Schedules are functions of the step so that a resumed run
continues exactly where it stopped.
"""
from __future__ import annotations

import ast
import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from dalle.errors import ConfigError


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
        raise ConfigError("device: cuda was asked for but torch sees no GPU (use auto or cpu)")
    return torch.device(name)


# ----------------------------------------------------------------------------- weight decay
def decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """The one weight-decay rule (docs/decisions.md): decoupled decay applies to the weight
    matrices and convolution kernels of the layers that multiply their input (ndim >= 2), never
    to biases, gains or scalars (ndim < 2) nor to embedding tables (nn.Embedding, and parameters
    used as positional tables, named `pos*`)."""
    return param.ndim >= 2 and not isinstance(module, nn.Embedding) and not name.startswith("pos")


def named_decays(model: nn.Module) -> Iterator[tuple[nn.Parameter, bool]]:
    """Every parameter of `model` once, with whether it decays."""
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield p, decays(module, name, p)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups under the one rule: the decaying tensors, then the rest at 0."""
    pairs = list(named_decays(model))
    return [{"params": [p for p, d in pairs if d], "weight_decay": weight_decay},
            {"params": [p for p, d in pairs if not d], "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- single process
class LocalStrategy:
    """One process: the strategy hooks the training loop calls (the same names as
    dalle.distributed.strategy.ShardedStrategy, which spreads them over Horovod ranks)."""

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
        """Iterate averaging; the average starts at the weights after the first update."""
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
