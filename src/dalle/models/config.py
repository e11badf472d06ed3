"""Frozen model configs (nanoGPT's `GPTConfig` style) and their checkpoint round trip.

Each model module owns one frozen dataclass: `PriorConfig`, `DVAEConfig`, `ClipConfig`. A trainer
builds it from its params section (`from_section`), the model is constructed from it alone, the
checkpoint stores `asdict(config)` in its metadata, and the model's one loader reads it back
through `from_dict`, which refuses a missing, unknown or mistyped key in one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable, Iterator, Mapping, TypeVar, get_type_hints

import torch

from dalle.errors import CheckpointError

C = TypeVar("C")
_ACCEPTS = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def from_section(cls: type[C], section: Any, **extra: Any) -> C:
    """The config of `cls` from a params section (attributes of the same name) plus `extra`
    (values the section does not hold, e.g. vocabularies measured on the data)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {n: extra[n] if n in extra else getattr(section, n) for n in names}
    return cls(**values)


def from_dict(cls: type[C], data: Any, source: str) -> C:
    """The config of `cls` from a checkpoint's stored mapping, checked key by key and by type."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{source}: the stored model config is a {type(data).__name__}, "
                              "not a mapping")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    missing = [n for n in names if n not in data]
    unknown = sorted(set(data) - set(names))
    if missing or unknown:
        what = f"lacks {missing[0]!r}" if missing else f"has unknown key {unknown[0]!r}"
        raise CheckpointError(f"{source}: the stored model config {what} (written by another "
                              "version? retrain it)")
    values = {}
    for name in names:
        value, kind = data[name], hints[name]
        ok = isinstance(value, _ACCEPTS.get(kind, (kind,))) and not (
            kind is not bool and isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{source}: stored model config {name}={value!r} is not "
                                  f"{kind.__name__}")
        if kind in (int, float) and not _in_range(value):
            raise CheckpointError(f"{source}: stored model config {name}={value!r} is out of "
                                  f"range (a size or rate of a model: finite, 0 to {_MAX_INT})")
        values[name] = float(value) if kind is float else value
    try:
        return cls(**values)
    except (ValueError, ArithmeticError) as exc:  # __post_init__ checks (heads dividing width...)
        raise CheckpointError(f"{source}: stored model config is invalid: {exc}") from None


_MAX_INT = 2 ** 24  # no size of any model here comes near it (paper: 8192 codes, 16384 BPE ids)


def _in_range(value: float) -> bool:
    return math.isfinite(value) and (not isinstance(value, int) or 0 <= value <= _MAX_INT)


def check_weights(model_cls: Callable[[Any], Any], config: Any, weights: Mapping[str, Any],
                  source: str) -> None:
    """Refuse, in one line, weights that do not fit the model `config` describes, before the
    model is built: it is first made on the meta device (no memory), and abandoned as soon as it
    registers more parameters than the checkpoint holds, so a tampered config asking for a huge
    model is refused instead of allocated."""
    try:
        with torch.device("meta"), _parameter_budget(len(weights)):
            shapes = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    except _OverBudget:
        raise CheckpointError(f"{source} does not match its stored config: the config makes a "
                              f"model with more than its {len(weights)} tensors") from None
    except Exception as exc:  # noqa: BLE001 - any failure to build from a stored config (n_layers 0...)
        raise CheckpointError(f"{source}: stored model config cannot build a model "
                              f"({' '.join(str(exc).split())[:120]})") from None
    missing = sorted(set(shapes) - set(weights))
    unknown = sorted(set(weights) - set(shapes))
    if missing or unknown:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has unknown tensor {unknown[0]!r}"
        raise CheckpointError(f"{source} does not match its stored config: it {what}")
    for name, shape in shapes.items():
        found = tuple(weights[name].shape)
        if found != shape:
            raise CheckpointError(f"{source} does not match its stored config: tensor {name!r} "
                                  f"is {list(found)}, the config makes {list(shape)}")


class _OverBudget(Exception):
    pass


@contextlib.contextmanager
def _parameter_budget(limit: int) -> Iterator[None]:
    """Raise _OverBudget once this thread has registered more than `limit` parameters."""
    me, count = threading.get_ident(), [0]

    def hook(module: Any, name: str, param: Any) -> None:
        if threading.get_ident() == me and param is not None:
            count[0] += 1
            if count[0] > limit:
                raise _OverBudget

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
