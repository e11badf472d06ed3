"""Compare the outputs of a resumed run with an uninterrupted one, file by file.

safetensors: same tensor names, `torch.equal` tensors, same metadata; npz: `np.array_equal`
arrays; parquet: `DataFrame.equals`; json: equal once wall-clock fields (seconds, rates) are
dropped (and `shards_written`, which counts what the resumed invocation did); anything else (tar shards, PNGs, text): byte for byte. Temporary files of `dalle.io`
(`.<name>.*.tmp`) must not be left in the output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

TIMING_WORDS = ("seconds", "per_s", "_s_", "time", "gflop")
RUN_KEYS = ("shards_written",)  # what this invocation did (a resumed collect writes fewer shards)


def _strip_timing(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_timing(v) for k, v in node.items()
                if k not in RUN_KEYS and not any(w in f"{k}_" for w in TIMING_WORDS)}
    if isinstance(node, list):
        return [_strip_timing(v) for v in node]
    return node


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def same_file(a: Path, b: Path) -> bool:
    if a.suffix == ".safetensors":
        (ta, ma), (tb, mb) = _safetensors(a), _safetensors(b)
        return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    if a.suffix == ".npz":
        with np.load(a) as na, np.load(b) as nb:
            return set(na.files) == set(nb.files) and all(np.array_equal(na[k], nb[k]) for k in na.files)
    if a.suffix == ".parquet":
        return pd.read_parquet(a).equals(pd.read_parquet(b))
    if a.suffix == ".json":
        return _strip_timing(json.loads(a.read_text())) == _strip_timing(json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary files/dirs of dalle.io still lying in an output tree."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def diff_trees(a: Path, b: Path, subdirs: Iterable[str]) -> list[str]:
    """Differences between the outputs `subdirs` of two run roots (empty list = identical)."""
    problems: list[str] = []
    for sub in subdirs:
        fa, fb = files(a / sub), files(b / sub)
        problems += [f"{sub}/{f}: only in the uninterrupted run" for f in sorted(fa - fb)]
        problems += [f"{sub}/{f}: only in the resumed run" for f in sorted(fb - fa)]
        problems += [f"{sub}/{f}: differs" for f in sorted(fa & fb)
                     if not same_file(a / sub / f, b / sub / f)]
    return problems
