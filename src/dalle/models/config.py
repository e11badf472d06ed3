"""Frozen model configs (nanoGPT's `GPTConfig` style) and their checkpoint round trip.

Each model module owns one frozen dataclass: `PriorConfig`, `DVAEConfig`, `ClipConfig`. A trainer
builds it from its params section (`from_section`), the model is constructed from it alone, the
checkpoint stores `asdict(config)` in its metadata, and the model's one loader reads it back
through `from_dict`, which refuses a missing, unknown or mistyped key in one line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar, get_type_hints

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
        values[name] = float(value) if kind is float else value
    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__ checks (e.g. heads dividing the width)
        raise CheckpointError(f"{source}: stored model config is invalid: {exc}") from None


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
