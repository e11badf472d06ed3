"""Reading a split of the collected data: clean manifest rows + images from the raw shards.

`load_split(art, split)` uses the clean manifest (rows with status ok and null
`dup_of`, written by the dedup stage); before dedup has run it falls back to the raw manifest
with a warning. Images come from the raw tar shards via `shards.iter_tar` (nothing extracted).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image

from dalle.catalog import SPLITS, Artefacts
from dalle.data.shards import iter_tar, shard_file
from dalle.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.keys)


def read_manifest(art: Artefacts) -> pd.DataFrame:
    """The clean manifest's usable rows (or the raw manifest's ok rows, with a warning)."""
    clean, raw = art.clean_manifest, art.raw_manifest
    if clean.exists():
        frame = pd.read_parquet(clean)
        if "dup_of" in frame.columns:
            frame = frame[frame["dup_of"].isna()]
    elif raw.exists():
        log.warning("%s does not exist (dedup has not run); reading the raw manifest %s",
                    clean, raw)
        frame = pd.read_parquet(raw)
    else:
        raise DataError(f"no manifest: neither {clean} nor {raw} exists; run the collect stage")
    return frame[frame["status"] == "ok"].reset_index(drop=True)


def _decode(data: bytes, key: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))  # [H, W, 3]
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"image {key!r} in the raw shards cannot be decoded ({exc})") from None


def load_split(art: Artefacts, split: str, limit: Optional[int] = None) -> Split:
    """Keys, captions, uint8 images [N, H, W, 3] and metadata of one split, in manifest order."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rows = read_manifest(art)
    rows = rows[rows["split"] == split]
    if limit is not None:
        rows = rows.iloc[:limit]
    if rows.empty:
        raise DataError(f"split {split!r} has no usable images in the manifest under {art.raw}")
    found: dict[str, tuple[np.ndarray, dict]] = {}
    for shard, group in rows.groupby("shard", sort=True):
        wanted = set(group["key"])
        tar = shard_file(art.raw, int(shard), ".tar")
        if not tar.exists():
            raise DataError(f"raw shard {tar} is missing; rerun the collect stage")
        for key, _ext, data, _caption, meta in iter_tar(tar):
            if key in wanted and data is not None:
                found[key] = (_decode(data, key), meta)
    missing = [k for k in rows["key"] if k not in found]
    if missing:
        raise DataError(f"image {missing[0]!r} ({len(missing)} in all) is in the manifest but "
                        "not in its raw shard; rerun the collect stage")
    shapes = {found[k][0].shape for k in rows["key"]}
    if len(shapes) > 1:
        raise DataError(f"split {split!r} mixes image shapes {sorted(shapes)}; "
                        "recollect with one data.image_size")
    keys = list(rows["key"])
    return Split(keys=keys, captions=list(rows["caption"]),
                 images=np.stack([found[k][0] for k in keys]), meta=[found[k][1] for k in keys])


def eval_captions(art: Artefacts) -> pd.DataFrame:
    """The evaluation captions: caption_id, caption, combo, spec (JSON or null)."""
    path = art.eval_captions
    if not path.exists():
        raise DataError(f"{path} does not exist; run the collect stage")
    return pd.read_parquet(path)
