"""The real images FID/IS compare against, read from the clean val shards one at a time.

A large reference set never holds the val split in memory: it is a list of item numbers into
the split's shards, decoded (and blurred, paper fig. 9a) when torch-fidelity asks for an item. A
split whose decoded size is under `loader.in_memory_max_mb` keeps its pixels from the first pass
instead (the training reader's rule), so the sets of every radius and reference do not decode it
again. That first pass finds the readable items (an undecodable one is skipped and counted, as in
training) and hashes their pixels into the set's fingerprint, so cached features are reused only
for the same pixels.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.data.reader import BadSamples, ShardSet, SplitIndex, split_index
from dalle.distributed.launch import rank_and_world
from dalle.errors import DataError

log = logging.getLogger(__name__)


def blur_one(image: np.ndarray, radius: float) -> np.ndarray:
    """Paper fig. 9(a): Gaussian filter of `radius` (sigma, pixels) over H and W of uint8
    [H, W, 3] (the same numbers as filtering the whole batch at once)."""
    if radius <= 0:
        return image
    out = gaussian_filter(image.astype(np.float32), sigma=(radius, radius, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class RealImages(torch.utils.data.Dataset):
    """Items of a split -> uint8 [3, H, W] (torch-fidelity's input), blurred by `radius`."""

    def __init__(self, index: SplitIndex, items: list[int], fingerprint: str,
                 radius: float = 0.0, pixels: Optional[np.ndarray] = None) -> None:
        self.index, self.items, self.fingerprint, self.radius = index, items, fingerprint, radius
        self.shape = (len(items), index.side, index.side, 3)  # what the images are once decoded
        self.pixels = pixels  # uint8 [len(items), H, W, 3] when the split is small, else None
        self._data: Optional[ShardSet] = None

    def __len__(self) -> int:
        return len(self.items)

    def blurred(self, radius: float) -> "RealImages":
        return RealImages(self.index, self.items, self.fingerprint, radius, self.pixels)

    def subset(self, keep: np.ndarray, fingerprint: str) -> "RealImages":
        return RealImages(self.index, [i for i, k in zip(self.items, keep) if k], fingerprint,
                          self.radius, None if self.pixels is None else self.pixels[keep])

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.pixels[i] if self.pixels is not None else self._read(i)  # [H, W, 3]
        return torch.from_numpy(np.ascontiguousarray(blur_one(image, self.radius))).permute(2, 0, 1)

    def _read(self, i: int) -> np.ndarray:
        if self._data is None:
            self._data = ShardSet(self.index)
        image, reason, _key = self._data[self.items[i]]
        if image is None:  # readable in the first pass; gone since
            raise DataError(f"val image became unreadable while evaluating ({reason}); rerun prepare")
        return image


def _scan(index: SplitIndex, max_bad_fraction: float, keep_pixels: bool
          ) -> tuple[list[int], list[str], list[str], Optional[np.ndarray]]:
    """One pass over the split: (readable items, their keys, per-item pixel digests, and their
    pixels uint8 [n, H, W, 3] if `keep_pixels`)."""
    data, bad = ShardSet(index), BadSamples(max_bad_fraction, "val split (reference images)")
    items, keys, digests, kept = [], [], [], []
    try:
        for i in tqdm(range(len(data)), desc="evaluate: reference images", unit="img",
                      disable=rank_and_world()[0] != 0):
            image, reason, key = data[i]
            bad.add(1, int(image is None), reason if image is None else None)
            if image is not None:
                items.append(i), keys.append(key)
                digests.append(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest())
                if keep_pixels:
                    kept.append(image)
    finally:
        data.close()
    pixels = np.stack(kept) if keep_pixels and kept else None
    return items, keys, digests, pixels


def _fingerprint(keys: list[str], digests: list[str], side: int) -> str:
    h = hashlib.sha1(f"{len(keys)}x{side}".encode())
    for key, digest in zip(keys, digests):
        h.update(f"{key}:{digest};".encode())
    return h.hexdigest()[:12]


def reference_sets(art: Artefacts, max_bad_fraction: float,
                   in_memory_max_mb: float = 0.0) -> dict[str, RealImages]:
    """'all' clean val images, and 'no_overlap': minus the val images dedup flagged as
    overlapping train (the paper's dashed lines). Held in memory if the decoded split is at most
    `in_memory_max_mb`, else read lazily."""
    index = split_index(art, "val")
    small = len(index) * index.side * index.side * 3 <= in_memory_max_mb * 2**20
    items, keys, digests, pixels = _scan(index, max_bad_fraction, small)
    sets = {"all": RealImages(index, items, _fingerprint(keys, digests, index.side), 0.0, pixels)}
    if art.overlap.is_file():
        ov = pd.read_parquet(art.overlap)
        bad = set(ov.loc[ov["overlap"].astype(bool), "val_key"]) if len(ov) else set()
        keep = np.array([k not in bad for k in keys], dtype=bool)
        kept = [(k, d) for k, d, ok in zip(keys, digests, keep) if ok]
        sets["no_overlap"] = sets["all"].subset(
            keep, _fingerprint([k for k, _ in kept], [d for _, d in kept], index.side))
    else:
        log.warning("%s not found: the no_overlap reference equals all val images", art.overlap)
        sets["no_overlap"] = sets["all"]
    return sets
