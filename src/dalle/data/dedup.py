"""The `dedup` stage (paper §3.2): duplicates within each split, and val<->train overlap.

1. Every ok image of `paths.raw` is decoded once: sha256 of its pixels (exact duplicates, whatever
   the encoding) and `imagehash.phash` (near duplicates: crops, resizes, re-encodes, small
   brightness shifts).
2. Within each split, in manifest order, the first image of a group is kept; a later image is a
   duplicate of the nearest *kept* image within `dedup.near_threshold` bits (`dup_kind` "near") or
   with equal pixels ("exact"). Kept-only linking means chains (A~B~C with A far from C) never
   merge distinct images. Pairs are found by multi-index hashing (`dalle.data.hamming`), never
   by comparing all pairs.
3. Val images are NOT removed for resembling train images: as in the paper, every val image gets
   its closest train image and the distance, and those within the overlap threshold are flagged in
   the overlap table, so evaluation can report metrics with and without them (paper fig. 9).
   `find_overlap` takes hashes (hamming) or float embeddings (cosine) alike; with
   `dedup.use_embeddings` the contrastive model's image embeddings are used, as the paper does.

Outputs (dalle.catalog): the clean manifest (ok rows + `dup_of`, `dup_kind`), the overlap table
(val_key, train_key, distance, method, overlap) and the stage's metrics.
"""
from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import imagehash
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Dedup
from dalle.data import hamming
from dalle.data.images import decode_rgb, pixel_sha256, to_rgb
from dalle.data.shards import iter_tar, shard_file
from dalle.errors import ConfigError, DataError
from dalle.io import atomic_path, write_json
from dalle.models.clip import load_clip
from dalle.pixels import to_float
from dalle.stage import Out, StageSpec

log = logging.getLogger(__name__)
OVERLAP_COLUMNS = ["val_key", "train_key", "distance", "method", "overlap"]
MAX_EXACT_PAIRS = 2_000_000_000  # exact nearest by brute force up to this many val x train pairs
_MIN_SHARDS_FOR_POOL = 4  # worker start-up (forkserver: thread-safe, imports torch) pays off above


# ----------------------------------------------------------------------------- hashing
def image_hashes(rgb: Image.Image, hash_size: int, crop_scale: float, crop_grid: int
                 ) -> np.ndarray:
    """phash of the image, then of crop_grid x crop_grid crops at crop_scale -> bool [K+1, B].

    pHash alone does not survive a crop of a few percent (measured: half of 10% crops move it by
    more than 6 bits); matching a full hash against the other image's crop hashes does.
    """
    grey = rgb.convert("L")
    hashes = [imagehash.phash(grey, hash_size=hash_size).hash.reshape(-1)]
    width, height = grey.size
    cw, ch = round(width * crop_scale), round(height * crop_scale)
    if crop_grid > 0 and crop_scale < 1.0:
        for top in np.linspace(0, height - ch, crop_grid).round().astype(int):
            for left in np.linspace(0, width - cw, crop_grid).round().astype(int):
                box = (int(left), int(top), int(left) + cw, int(top) + ch)
                hashes.append(imagehash.phash(grey.crop(box), hash_size=hash_size).hash.reshape(-1))
    return np.stack(hashes)


def hash_image(data: bytes, hash_size: int, crop_scale: float = 1.0, crop_grid: int = 0
               ) -> tuple[str, np.ndarray, np.ndarray]:
    """Encoded image -> (pixel sha256, phash bits bool [K+1, B], pixels uint8 [H, W, 3])."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = to_rgb(img)
        pixels = np.asarray(rgb)  # [H, W, 3]
        bits = image_hashes(rgb, hash_size, crop_scale, crop_grid)
    return pixel_sha256(pixels), bits, pixels


def _hash_shard(args: tuple[str, frozenset, Dedup]) -> list[tuple[str, str, np.ndarray]]:
    tar_path, wanted, cfg = args
    out = []
    for key, _ext, image_bytes, _caption, _meta in iter_tar(tar_path):
        if key in wanted and image_bytes is not None:
            sha, bits, _pixels = hash_image(image_bytes, cfg.hash_size, cfg.crop_scale,
                                            cfg.crop_grid)
            out.append((key, sha, bits))
    return out


def hash_raw(raw_dir: Path, ok: pd.DataFrame, cfg: Dedup, workers: int = 2
             ) -> tuple[list[str], np.ndarray]:
    """Hash the ok rows of each raw shard -> (pixel sha256 per row, bits [N, K+1, B])."""
    jobs = [(str(shard_file(raw_dir, int(shard), ".tar")), frozenset(group["key"]), cfg)
            for shard, group in ok.groupby("shard", sort=True)]
    found: dict[str, tuple[str, np.ndarray]] = {}
    bar = tqdm(total=len(ok), desc="dedup: hashing", unit="img")
    parallel = workers > 1 and len(jobs) >= _MIN_SHARDS_FOR_POOL
    pool_cm = ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) if parallel \
        else _Inline()
    with pool_cm as pool:
        for result in pool.map(_hash_shard, jobs):
            for key, sha, bits in result:
                found[key] = (sha, bits)
            bar.update(len(result))
    bar.close()
    missing = [k for k in ok["key"] if k not in found]
    if missing:
        raise DataError(f"{len(missing)} ok rows of the raw manifest have no image in "
                        f"their shard (first: {missing[0]!r}); rerun collect")
    shas = [found[k][0] for k in ok["key"]]
    bits = np.stack([found[k][1] for k in ok["key"]])
    return shas, bits


def embed_raw(raw_dir: Path, rows: pd.DataFrame, embed: Callable[[np.ndarray], np.ndarray],
              batch: int = 512) -> np.ndarray:
    """Embeddings [N, D] of `rows` (key, shard), in row order, streamed shard by shard."""
    position = {k: i for i, k in enumerate(rows["key"])}
    out: list[Any] = [None] * len(rows)
    keys: list[str] = []
    images: list[np.ndarray] = []

    def flush() -> None:
        if images:
            for key, vector in zip(keys, embed(np.stack(images))):  # [b, H, W, 3] -> [b, D]
                out[position[key]] = vector
            keys.clear(), images.clear()

    for shard in sorted(rows["shard"].unique()):
        for key, _ext, data, _caption, _meta in iter_tar(shard_file(raw_dir, int(shard), ".tar")):
            if key in position and data is not None:
                keys.append(key), images.append(decode_rgb(data))
                if len(images) >= batch:
                    flush()
    flush()
    return np.stack(out)


class _Inline:
    """A stand-in for an executor: map in this process (one shard, or workers = 1)."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def map(self, fn: Callable, items: Sequence) -> Any:
        return map(fn, items)


# ----------------------------------------------------------------------------- duplicates
def find_duplicates(shas: Sequence[str], bits: np.ndarray, threshold: Optional[int]
                    ) -> tuple[list[Optional[int]], list[Optional[str]]]:
    """In the given order, index of the kept twin (or None) and the kind ("exact"/"near").

    bits: bool [N, B] or [N, K, B] (full hash first, then crop hashes). Two images are near
    duplicates when the full hash of one is within `threshold` of any hash of the other;
    threshold None: exact duplicates only.
    """
    bits = bits[:, None, :] if bits.ndim == 2 else bits
    n = len(shas)
    dup_of: list[Optional[int]] = [None] * n
    kind: list[Optional[str]] = [None] * n
    first: dict[str, int] = {}
    for i, sha in enumerate(shas):
        if sha in first:
            dup_of[i], kind[i] = first[sha], "exact"
        else:
            first[sha] = i
    if threshold is None:
        return dup_of, kind
    distinct = np.array(sorted(first.values()), dtype=np.int64)
    q, item, d = hamming.pairs_multi(bits[distinct, 0], bits[distinct], threshold)
    a, b = distinct[np.minimum(q, item)], distinct[np.maximum(q, item)]
    a, b, d = hamming.min_per_pair(a[q != item], b[q != item], d[q != item], max(n, 1))
    neighbours: dict[int, list[tuple[int, int]]] = {}
    for x, y, dist in zip(a.tolist(), b.tolist(), d.tolist()):
        neighbours.setdefault(y, []).append((dist, x))  # x < y: x comes first
    for y in sorted(neighbours):
        kept = [(dist, x) for dist, x in neighbours[y] if dup_of[x] is None]
        if kept:
            dup_of[y], kind[y] = min(kept)[1], "near"  # nearest kept twin, earliest on ties
    return dup_of, kind


# ----------------------------------------------------------------------------- overlap
def find_overlap(val_keys: Sequence[str], val_vectors: np.ndarray, train_keys: Sequence[str],
                 train_vectors: np.ndarray, threshold: float, method: str,
                 max_exact_pairs: int = MAX_EXACT_PAIRS) -> pd.DataFrame:
    """For every val item its closest train item, the distance and whether it overlaps.

    method "hamming": vectors are bool hashes [N, B] or [N, K, B] (full hash, then crop hashes);
    distance in bits; overlap = d <= threshold. Pairs within the threshold (full hash of one vs
    any hash of the other) come from multi-index hashing; the closest train image beyond it is
    found by brute force on full hashes while val x train <= max_exact_pairs (null beyond).
    method "cosine": float embeddings [N, D]; distance = 1 - cosine; overlap = cos >= threshold.
    """
    n_val = len(val_keys)
    if method == "hamming":
        idx, dist = _nearest_hamming(val_vectors, train_vectors, int(threshold), max_exact_pairs)
        overlap = dist <= threshold
    elif method == "cosine":
        idx, sim = _nearest_cosine(val_vectors, train_vectors)
        dist, overlap = 1.0 - sim, sim >= threshold
    else:
        raise ValueError(f"unknown overlap method {method!r} (hamming or cosine)")
    train = np.asarray(train_keys, dtype=object)
    found = idx >= 0
    return pd.DataFrame({
        "val_key": pd.Series(list(val_keys), dtype="string"),
        "train_key": pd.Series([train[i] if ok else None for i, ok in zip(idx, found)],
                               dtype="string"),
        "distance": np.where(found, dist, np.nan).astype(np.float64),
        "method": pd.Series([method] * n_val, dtype="string"),
        "overlap": np.asarray(overlap & found, dtype=bool),
    }, columns=OVERLAP_COLUMNS)


def _nearest_hamming(val_bits: np.ndarray, train_bits: np.ndarray, radius: int,
                     max_exact_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    val_bits = val_bits[:, None, :] if val_bits.ndim == 2 else val_bits  # [V, K, B]
    train_bits = train_bits[:, None, :] if train_bits.ndim == 2 else train_bits  # [T, K, B]
    n_val = len(val_bits)
    idx = np.full(n_val, -1, dtype=np.int64)
    dist = np.full(n_val, np.iinfo(np.int64).max, dtype=np.int64)
    if n_val == 0 or len(train_bits) == 0:
        return idx, dist.astype(np.float64)
    v1, t1, d1 = hamming.pairs_multi(val_bits[:, 0], train_bits, radius)  # val full ~ train crops
    t2, v2, d2 = hamming.pairs_multi(train_bits[:, 0], val_bits, radius)  # train full ~ val crops
    q, b, d = hamming.min_per_pair(np.concatenate([v1, v2]), np.concatenate([t1, t2]),
                                   np.concatenate([d1, d2]), len(train_bits))
    order = np.lexsort((b, d, q))  # per val: smallest distance, then earliest train row
    q, b, d = q[order], b[order], d[order]
    first = np.concatenate(([True], q[1:] != q[:-1])) if len(q) else np.zeros(0, bool)
    idx[q[first]], dist[q[first]] = b[first], d[first]
    rest = np.flatnonzero(idx < 0)
    if len(rest) and len(rest) * len(train_bits) <= max_exact_pairs:
        idx[rest], dist[rest] = hamming.nearest_bruteforce(val_bits[rest, 0], train_bits[:, 0])
    return idx, dist.astype(np.float64)


def _nearest_cosine(val: np.ndarray, train: np.ndarray, block: int = 1024
                    ) -> tuple[np.ndarray, np.ndarray]:
    if len(val) == 0 or len(train) == 0:
        return np.full(len(val), -1, dtype=np.int64), np.full(len(val), -np.inf)
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    v, t = unit(val), unit(train)  # [V, D], [T, D]
    idx, sim = np.zeros(len(v), dtype=np.int64), np.zeros(len(v), dtype=np.float64)
    for s in range(0, len(v), block):
        cos = v[s:s + block] @ t.T  # [block, T]
        idx[s:s + block] = cos.argmax(axis=1)
        sim[s:s + block] = cos[np.arange(len(cos)), idx[s:s + block]]
    return idx, sim


def clip_embedder(checkpoint: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised image embeddings [N, D] of uint8 images [N, H, W, 3] from a contrastive model
    (paper §3.2 finds each val image's closest train image with one)."""
    if not checkpoint.is_file():
        raise ConfigError(f"dedup.use_embeddings is true but {checkpoint} does not exist; train "
                          "the contrastive model first (dvc repro train_clip) or set it to false")
    model = load_clip(checkpoint)

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        return model.encode_image(to_float(images)).numpy().astype(np.float32)

    return embed


# ----------------------------------------------------------------------------- the stage
def read_raw_manifest(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} does not exist; run the collect stage first")
    try:
        manifest = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})") from None
    missing = {"key", "status", "split", "shard"} - set(manifest.columns)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; rerun collect")
    return manifest


def mark_duplicates(ok: pd.DataFrame, shas: list[str], bits: np.ndarray,
                    threshold: Optional[int]) -> pd.DataFrame:
    """ok rows + `dup_of` (key of the kept twin in the same split) and `dup_kind`."""
    dup_of: list[Optional[str]] = [None] * len(ok)
    kind: list[Optional[str]] = [None] * len(ok)
    keys = ok["key"].to_numpy()
    for _split, rows in ok.groupby("split", sort=True).indices.items():  # rows: positions
        twin, what = find_duplicates([shas[r] for r in rows], bits[rows], threshold)
        for pos, (t, k) in enumerate(zip(twin, what)):
            if t is not None:
                dup_of[rows[pos]], kind[rows[pos]] = keys[rows[t]], k
    return ok.assign(dup_of=pd.Series(dup_of, dtype="string", index=ok.index),
                     dup_kind=pd.Series(kind, dtype="string", index=ok.index))


def _overlap(cfg: Dedup, art: Artefacts, clean: pd.DataFrame, bits: np.ndarray
             ) -> tuple[pd.DataFrame, float]:
    kept = clean["dup_of"].isna().to_numpy()
    val = np.flatnonzero(kept & (clean["split"] == "val").to_numpy())
    train = np.flatnonzero(kept & (clean["split"] == "train").to_numpy())
    keys = clean["key"].to_numpy()
    if cfg.use_embeddings:
        embed = clip_embedder(art.clip)
        vectors = {name: embed_raw(art.raw, clean.iloc[rows], embed)
                   for name, rows in (("val", val), ("train", train)) if len(rows)}
        val_vec, train_vec = vectors.get("val"), vectors.get("train")
        method, threshold = "cosine", cfg.embedding_threshold
    else:
        val_vec, train_vec = bits[val], bits[train]
        method, threshold = "hamming", float(cfg.overlap_threshold)
    if val_vec is None or train_vec is None:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            OVERLAP_COLUMNS, ["string", "string", "float64", "string", "bool"])}), threshold
    table = find_overlap(keys[val], val_vec, keys[train], train_vec, threshold, method,
                         cfg.exact_nearest_max_pairs)
    return table, threshold


def run_dedup(art: Artefacts, tracker: Any, dedup: Dedup, workers: int = 2) -> dict[str, Any]:
    """The stage body: raw manifest + shards -> clean manifest, overlap table, metrics."""
    cfg, start = dedup, time.perf_counter()
    manifest = read_raw_manifest(art.raw_manifest)
    ok = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    if ok.empty:
        raise DataError(f"{art.raw_manifest} has no ok rows; nothing to deduplicate")
    shas, bits = hash_raw(art.raw, ok, cfg, workers)
    clean = mark_duplicates(ok, shas, bits, cfg.near_threshold if cfg.remove_near else None)
    overlap, threshold = _overlap(cfg, art, clean, bits)
    with atomic_path(art.dedup_manifest) as tmp:
        clean.to_parquet(tmp, index=False)
    with atomic_path(art.overlap) as tmp:
        overlap.to_parquet(tmp, index=False)
    metrics = _metrics(cfg, clean, overlap, threshold, time.perf_counter() - start)
    write_json(art.metrics("dedup"), metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_artifact(art.overlap, "dedup")
    log.info("dedup: kept %d of %d ok images (%d exact, %d near duplicates); %d of %d val images "
             "overlap train", metrics["kept"], metrics["ok_rows"], metrics["removed_exact"],
             metrics["removed_near"], metrics["val_overlap"], metrics["val_checked"])
    return metrics


def _metrics(cfg: Dedup, clean: pd.DataFrame, overlap: pd.DataFrame, threshold: float,
             seconds: float) -> dict[str, Any]:
    kinds = clean["dup_kind"].value_counts()
    kept = clean[clean["dup_of"].isna()]
    n_val, n_over = len(overlap), int(overlap["overlap"].sum()) if len(overlap) else 0
    return {
        "ok_rows": len(clean), "kept": len(kept),
        "kept_train": int((kept["split"] == "train").sum()),
        "kept_val": int((kept["split"] == "val").sum()),
        "removed_exact": int(kinds.get("exact", 0)), "removed_near": int(kinds.get("near", 0)),
        "val_checked": n_val, "val_overlap": n_over,
        "overlap_rate": n_over / n_val if n_val else 0.0,
        "overlap_method": "cosine" if cfg.use_embeddings else "hamming",
        "overlap_threshold": threshold,
        "near_threshold": cfg.near_threshold if cfg.remove_near else -1,
        "hash_size": cfg.hash_size, "seconds": round(seconds, 3),
    }


STAGE = StageSpec(
    name="dedup", fn=run_dedup, params=("dedup",),
    inputs=lambda a: (a.raw,),
    outputs=lambda a: (Out(a.dedup), Out(a.metrics("dedup"), metric=True)),
    summary="exact + perceptual-hash duplicates, val↔train overlap (§3.2)",
)
