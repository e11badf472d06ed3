"""The `webdataset` source: existing tar shards (e.g. img2dataset output) ingested as they are.

`data.webdataset.paths` lists tar files or globs, expanded in sorted order. Input tar i becomes
output shard i (so a rerun skips what is complete). Members are read with `shards.read_samples`,
which never extracts anything to disk and refuses unsafe member names (`..`, absolute paths,
links, devices) with a DataError naming the member: nothing is ever written outside
the raw shards. A sample whose members exceed `data.webdataset.max_bytes` (by their declared
size, before anything is decompressed), whose metadata does not parse, or that fails in any other
way is that sample's failed manifest row. Images are normalised like every other source (size,
RGB, format); the original key, url and metadata are kept in the sample's json.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Data
from dalle.data import shards
from dalle.data.images import ImageRejected, process_image
from dalle.data.source_common import check_resume, fingerprint, guard_row, shard_key, summarise
from dalle.errors import DataError

SOURCE = "webdataset"


def input_tars(patterns: tuple[str, ...]) -> list[Path]:
    if not patterns:
        raise DataError("data.source is webdataset but data.webdataset.paths is empty")
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        tars = [Path(m) for m in matches if Path(m).is_file()]
        if not tars:
            raise DataError(f"data.webdataset.paths entry {pattern!r} matches no tar file")
        found += [t for t in tars if t not in found]
    return found


def ingest_tar(tar: Path, shard: int, data_cfg: Data, shard_size: int) -> list[shards.Sample]:
    samples = []
    for pos, found in enumerate(shards.read_samples(tar, data_cfg.webdataset.max_bytes)):
        new_key = shard_key(shard, pos, max(shard_size, pos + 1))
        url = f"{tar.name}#{found.key}"
        fmt = data_cfg.webdataset.image_format
        samples.append(guard_row(lambda: _ingest(found, new_key, tar, data_cfg), new_key,
                                 found.caption or "", url, SOURCE, fmt))
    return samples


def _ingest(found: shards.TarSample, new_key: str, tar: Path, data_cfg: Data) -> shards.Sample:
    """One sample of an input tar -> the normalised sample, or a failed one with its reason."""
    cfg = data_cfg.webdataset
    meta = dict(found.meta, source_key=found.key, source_tar=tar.name)
    url = str(meta.get("url") or f"{tar.name}#{found.key}")
    caption = found.caption or ""
    error = found.error or (None if found.image is not None
                            else f"no_image: member {found.key} has no image ({found.ext})")
    if error is None and found.image is not None:
        try:
            img = process_image(found.image, data_cfg.image_size, min_side=cfg.min_side,
                                max_pixels=cfg.max_pixels, fmt=cfg.image_format,
                                quality=cfg.jpeg_quality)
            meta.update(original_width=img.original_width, original_height=img.original_height)
            return shards.Sample(key=new_key, caption=caption, image_bytes=img.data, ext=img.ext,
                                 meta=meta, status="ok", error=None, url=url, source=SOURCE)
        except ImageRejected as exc:
            error = str(exc)
    return shards.Sample(key=new_key, caption=caption, image_bytes=None, ext=cfg.image_format,
                         meta=meta, status="failed", error=error, url=url, source=SOURCE)


def collect_webdataset(data_cfg: Data, art: Artefacts, tracker: Any, seed: int) -> dict[str, Any]:
    """Input tars -> the raw shards (one per input tar) + manifest; returns metrics."""
    tars = input_tars(data_cfg.webdataset.paths)
    out = art.raw
    check_resume(out, fingerprint(data_cfg, data_cfg.webdataset, tars, seed))
    done = shards.completed_shards(out)
    split_fn = shards.split_fn(data_cfg, seed)
    todo = [i for i in range(len(tars)) if i not in done]
    for shard in tqdm(todo, desc="collect: webdataset", unit="tar"):
        samples = ingest_tar(tars[shard], shard, data_cfg, data_cfg.shard_size)
        shards.write_shard(out, shard, samples, split_fn)
    metrics = summarise(art, None, len(todo), tracker, SOURCE)
    metrics["input_tars"] = len(tars)
    return metrics
