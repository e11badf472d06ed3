"""The `collect` stage: dispatch on `data.source`, then write eval captions and metrics.

Sources: synthetic (`dalle.data.synthetic`), url_list, folder, webdataset, openmoji
(`dalle.data.openmoji`: the OpenMoji drawings through the folder source's caption table). Every source writes
img2dataset-layout shards into the raw directory through `dalle.data.shards`; this function adds
the evaluation captions for the real sources (a deterministic sample of val captions, combo "val")
and the stage's metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dalle.catalog import Artefacts
from dalle.config_sections import Data
from dalle.data.folder import collect_folder
from dalle.data.openmoji import collect_openmoji
from dalle.data.source_common import val_caption_frame
from dalle.data.synthetic import collect_synthetic
from dalle.data.url_list import collect_urls
from dalle.data.webdataset_source import collect_webdataset
from dalle.errors import ConfigError, DataError
from dalle.io import atomic_path, write_json
from dalle.stage import Out, StageSpec

SourceFn = Callable[[Data, Artefacts, Any, int], dict[str, Any]]
SOURCES: dict[str, SourceFn] = {
    "synthetic": collect_synthetic,
    "url_list": collect_urls,
    "folder": collect_folder,
    "webdataset": collect_webdataset,
    "openmoji": collect_openmoji,
}
OWN_EVAL_CAPTIONS = ("synthetic", "openmoji")  # sources that write their evaluation captions


def source_fn(source: str) -> SourceFn:
    if source not in SOURCES:
        raise ConfigError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[source]


def write_val_captions(path: Path, manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Evaluation captions for real data: up to n val captions (combo "val", no spec)."""
    frame = val_caption_frame(manifest, n, seed)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def collect(art: Artefacts, tracker: Any, data: Data, seed: int) -> dict[str, Any]:
    """Run the configured source into the raw directory; returns and writes the metrics."""
    metrics = dict(source_fn(data.source)(data, art, tracker, seed), source=data.source)
    manifest = pd.read_parquet(art.raw_manifest)
    if not (manifest["status"] == "ok").any():
        raise DataError(f"data.source {data.source}: no usable images were collected")
    if data.source not in OWN_EVAL_CAPTIONS:
        evals = write_val_captions(art.raw_eval_captions, manifest, data.eval_captions, seed)
        metrics["eval_captions_val"] = len(evals)
    counts = manifest.loc[manifest["status"] == "ok", "split"].value_counts()
    metrics.update(train=int(counts.get("train", 0)), val=int(counts.get("val", 0)))
    write_json(art.metrics("collect"), metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.log_dict(json.loads(json.dumps(metrics)), "collect_metrics.json")
    return metrics


STAGE = StageSpec(
    name="collect", fn=collect, params=("data", "seed"),
    inputs=lambda a: (),
    outputs=lambda a: (Out(a.raw), Out(a.metrics("collect"), metric=True)),
    summary="renders the synthetic captioned world (default), or downloads a URL list, or ingests "
            "a folder/COCO or webdataset shards into img2dataset-style shards + manifest",
)
