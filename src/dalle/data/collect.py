"""The `collect` stage: dispatch on `data.source`, then write eval captions and metrics.

Sources: synthetic (`dalle.data.synthetic`), url_list, folder, webdataset (the real-data
modules, imported lazily). Every source writes img2dataset-layout shards into `paths.raw`
through `dalle.data.shards`; this function adds `eval_captions.parquet` for the real sources
(a deterministic sample of val captions, combo "val") and `metrics/collect.json`.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dalle.config_sections import Data, Paths
from dalle.data import shards
from dalle.errors import ConfigError, DataError
from dalle.io import atomic_path, write_json

SOURCES: dict[str, tuple[str, str]] = {
    "synthetic": ("dalle.data.synthetic", "collect_synthetic"),
    "url_list": ("dalle.data.url_list", "collect_urls"),
    "folder": ("dalle.data.folder", "collect_folder"),
    "webdataset": ("dalle.data.webdataset_source", "collect_webdataset"),
}


def source_fn(source: str) -> Callable[..., dict[str, Any]]:
    if source not in SOURCES:
        raise ConfigError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")
    module, name = SOURCES[source]
    return getattr(importlib.import_module(module), name)


def write_val_captions(raw: Path, manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """eval_captions.parquet for real data: up to n val captions (combo "val", no spec)."""
    val = manifest[(manifest["status"] == "ok") & (manifest["split"] == "val")]
    order = sorted(val["key"], key=lambda k: shards.key_fraction(k, seed + 1))[:n]
    picked = val.set_index("key").loc[order]
    frame = pd.DataFrame({"caption_id": [f"val-{k}" for k in order],
                          "caption": list(picked["caption"]), "combo": "val",
                          "spec": [None] * len(order)}).astype("string")
    with atomic_path(raw / "eval_captions.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def collect(data_cfg: Data, paths: Paths, tracker: Any) -> dict[str, Any]:
    """Run the configured source into `paths.raw`; returns and writes the collect metrics."""
    fn = source_fn(data_cfg.source)
    metrics = dict(fn(data_cfg, paths, tracker), source=data_cfg.source)
    raw = Path(paths.raw)
    manifest = pd.read_parquet(raw / "manifest.parquet")
    if not (manifest["status"] == "ok").any():
        raise DataError(f"data.source {data_cfg.source}: no usable images were collected")
    if data_cfg.source != "synthetic":
        evals = write_val_captions(raw, manifest, data_cfg.eval_captions, data_cfg.seed)
        metrics["eval_captions_val"] = len(evals)
    counts = manifest.loc[manifest["status"] == "ok", "split"].value_counts()
    metrics.update(train=int(counts.get("train", 0)), val=int(counts.get("val", 0)))
    write_json(Path(paths.metrics) / "collect.json", metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.log_dict(json.loads(json.dumps(metrics)), "collect_metrics.json")
    return metrics
