"""Reading the clean splits that the prepare stage wrote: one interface, two paths.

A split is the list of its clean shards (webdataset tars of `key.<png|jpg|webp>` + `key.txt`) and
their sample counts, from the clean manifest. `ShardSet` gives random access to its samples:
each shard is opened with wids' `IndexedTarSamples` (an mmap index of the tar's members: the
file is read where a sample lies, nothing is extracted), a few shards at a time (LRU), so the
memory a reader holds does not grow with the number of images.

* In memory (`load_split`): the whole split decoded into one uint8 array [N, H, W, 3], in
  manifest order - the fast path for splits up to `loader.in_memory_max_mb`.
* Streaming (`dalle.data.stream`): batches drawn through a DataLoader from a seeded, resumable,
  rank-split order over the same `ShardSet`.

A sample whose image cannot be decoded, or a shard that is missing or truncated, is skipped with
a counted warning; past `loader.max_bad_fraction` of what was read the reader stops with one
`DataError` line.
"""
from __future__ import annotations

import bisect
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image
from wids.wids import IndexedTarSamples
from wids.wids_lru import LRUCache

from dalle.catalog import SPLITS, Artefacts
from dalle.errors import DataError

log = logging.getLogger(__name__)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def read_manifest(art: Artefacts) -> pd.DataFrame:
    """The clean manifest: one row per sample the image stages read."""
    if not art.clean_manifest.is_file():
        raise DataError(f"{art.clean_manifest} does not exist; run the prepare stage first "
                        "(dvc repro prepare)")
    return pd.read_parquet(art.clean_manifest)


@dataclass(frozen=True)
class SplitIndex:
    """What the clean manifest says about one split: its shards and their sample counts, in
    order (keys and captions are read from the shards with the images, so an index is a few
    numbers per shard whatever the number of images)."""

    split: str
    shards: list[tuple[Path, int]]  # (tar, samples), in manifest order
    side: int  # the images' side (prepare stores them square, at data.image_size)

    def __len__(self) -> int:
        return sum(n for _, n in self.shards)


def split_index(art: Artefacts, split: str) -> SplitIndex:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not art.clean_manifest.is_file():
        raise DataError(f"{art.clean_manifest} does not exist; run the prepare stage first "
                        "(dvc repro prepare)")
    rows = pd.read_parquet(art.clean_manifest, columns=["split", "shard", "width"],
                           filters=[("split", "==", split)])  # three small columns, one split
    if rows.empty:
        raise DataError(f"split {split!r} has no samples in {art.clean_manifest}")
    counts = rows.groupby("shard", sort=False).size()
    return SplitIndex(split, [(art.clean_shard(split, int(s)), int(n)) for s, n in counts.items()],
                      int(rows["width"].iloc[0]))


class BadSamples:
    """Counts undecodable samples against what was read; one line past the fraction allowed."""

    def __init__(self, max_fraction: float, what: str) -> None:
        self.max_fraction, self.what = max_fraction, what
        self.bad = self.seen = 0

    def add(self, seen: int, bad: int, first: Optional[str] = None) -> None:
        self.seen, self.bad = self.seen + seen, self.bad + bad
        if bad:
            log.warning("%s: skipped %d undecodable sample(s) (%s); %d of %d so far", self.what,
                        bad, first, self.bad, self.seen)
        if self.seen and self.bad > self.max_fraction * max(self.seen, 1000):
            raise DataError(f"{self.what}: {self.bad} of {self.seen} samples read could not be "
                            f"decoded (more than loader.max_bad_fraction={self.max_fraction}); "
                            f"first: {first}; rerun prepare")


def _text(data: Any) -> str:
    return (data.getvalue() if hasattr(data, "getvalue") else bytes(data)).decode("utf-8")


def decode(data: bytes) -> np.ndarray:
    """Stored image bytes -> uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy needs one)


class ShardSet(torch.utils.data.Dataset):
    """Item i of a split -> (uint8 [H, W, 3], caption, key), or (None, reason, key) when the
    sample cannot be read; shards are opened lazily in each process, `lru` at a time."""

    def __init__(self, index: SplitIndex, lru: int = 4) -> None:
        self.index, self.lru = index, lru
        self.starts = np.cumsum([0] + [n for _, n in index.shards]).tolist()
        self._open: Optional[LRUCache] = None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": None}

    def _shard(self, s: int) -> IndexedTarSamples:
        if self._open is None:
            self._open = LRUCache(self.lru, release_handler=lambda _k, v: v.close())
        shard = self._open[s]
        if shard is None:
            path, count = self.index.shards[s]
            shard = IndexedTarSamples(path=str(path), expected_size=count)
            self._open[s] = shard
        return shard

    def __getitem__(self, i: int) -> tuple[Optional[np.ndarray], str, str]:
        s = bisect.bisect_right(self.starts, i) - 1
        where = f"{self.index.shards[s][0].name}: item {i - self.starts[s]}"
        try:
            sample = self._shard(s)[i - self.starts[s]]
            key = sample["__key__"]
            where = f"{self.index.shards[s][0].name}: {key}"
            data = next(sample[f".{e}"] for e in IMAGE_EXTS if f".{e}" in sample)
            image = decode(data.getvalue() if hasattr(data, "getvalue") else bytes(data))
            caption = _text(sample[".txt"])
        except Exception as exc:  # noqa: BLE001 - any failure to read a sample skips it
            return None, f"{where}: {type(exc).__name__}", where
        return image, caption, key

    def close(self) -> None:
        if self._open is not None:
            self._open.clear()


@dataclass
class Split:
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]

    def __len__(self) -> int:
        return len(self.keys)


def decoded_mb(index: SplitIndex) -> float:
    """The split's size once decoded (uint8 RGB), in MiB."""
    return len(index) * index.side * index.side * 3 / 2 ** 20


def iterate(index: SplitIndex, items: Optional[list[int]] = None, bad: Optional[BadSamples] = None
            ) -> Iterator[tuple[np.ndarray, str, str]]:
    """The split's readable samples in manifest order (or `items` in their order)."""
    data = ShardSet(index)
    bad = bad or BadSamples(0.0, f"{index.split} split")
    try:
        for i in (range(len(data)) if items is None else items):
            image, caption, key = data[i]
            bad.add(1, int(image is None), caption if image is None else None)
            if image is not None:
                yield image, caption, key
    finally:
        data.close()


def in_batches(art: Artefacts, split: str, size: int, max_bad_fraction: float,
               drop_last: bool = False) -> Iterator[tuple[np.ndarray, list[str]]]:
    """A split in manifest order, `size` readable samples at a time: (uint8 [B, H, W, 3],
    captions); the memory held does not grow with the split."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    bad = BadSamples(max_bad_fraction, f"{split} split")
    for image, caption, _key in iterate(split_index(art, split), bad=bad):
        images.append(image), captions.append(caption)
        if len(images) == size:
            yield np.stack(images), captions
            images, captions = [], []
    if images and not drop_last:
        yield np.stack(images), captions


def load_split(art: Artefacts, split: str, max_bad_fraction: float = 0.0) -> Split:
    """Keys, captions and uint8 images [N, H, W, 3] of one split, in manifest order."""
    index = split_index(art, split)
    keys, captions, images = [], [], []
    for image, caption, key in iterate(index, bad=BadSamples(max_bad_fraction, f"{split} split")):
        keys.append(key), captions.append(caption), images.append(image)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"split {split!r} mixes image shapes {sorted(shapes)}; rerun prepare")
    return Split(keys, captions, np.stack(images))


def eval_captions(art: Artefacts) -> pd.DataFrame:
    """The evaluation captions: caption_id, caption, combo, spec (JSON or null)."""
    path = art.eval_captions
    if not path.exists():
        raise DataError(f"{path} does not exist; run the collect and prepare stages")
    return pd.read_parquet(path)
