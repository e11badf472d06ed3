"""Dedup speed (targets: 100,000 images' hashes in <= 60 s, and growth 10k -> 100k not quadratic.

Hashes are synthetic with the stage's shape: per image one 64-bit full pHash plus 9 crop hashes
(the full hash with 2..8 bits flipped), 10% of images near copies (0..6 flipped bits) of another,
10% of images in val. Timed: within-split duplicates (`find_duplicates`, multi-index hashing) and
val->train overlap (`find_overlap`: index lookup + exact nearest for the rest, as paper §3.2
sorts every val image by its closest train image). Also: decode + hash throughput per image.

    python -m benchmarks.bench_dedup            # BENCH_QUICK=1 for a smoke run
"""
from __future__ import annotations

import io
import time

import numpy as np

from benchmarks.common import emit, quick, section
from dalle.data.dedup import find_duplicates, find_overlap, hash_image


def synthetic_hashes(n: int, n_bits: int = 64, crops: int = 9, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    full = rng.random((n, n_bits)) < 0.5  # [N, B]
    copies = rng.choice(n, n // 10, replace=False)
    full[copies] = full[rng.integers(0, n, len(copies))]
    full[copies] ^= rng.random((len(copies), n_bits)) < 3 / n_bits
    bits = np.repeat(full[:, None, :], crops + 1, axis=1)  # [N, K+1, B]
    bits[:, 1:] ^= rng.random((n, crops, n_bits)) < 5 / n_bits
    return bits


def time_dedup(n: int, cfg: Dedup) -> tuple[float, float, int, int]:
    bits = synthetic_hashes(n)
    shas = [str(i) for i in range(n)]
    is_val = np.random.default_rng(1).random(n) < 0.1
    start = time.perf_counter()
    removed = 0
    for mask in (~is_val, is_val):
        rows = np.flatnonzero(mask)
        dup_of, _ = find_duplicates([shas[r] for r in rows], bits[rows], cfg.near_threshold)
        removed += sum(d is not None for d in dup_of)
    t_dup = time.perf_counter() - start
    val, train = np.flatnonzero(is_val), np.flatnonzero(~is_val)
    start = time.perf_counter()
    table = find_overlap([str(i) for i in val], bits[val], [str(i) for i in train], bits[train],
                         cfg.overlap_threshold, "hamming", cfg.exact_nearest_max_pairs)
    t_overlap = time.perf_counter() - start
    return t_dup, t_overlap, removed, int(table["overlap"].sum())


def hash_throughput(cfg: Dedup, n: int = 300) -> float:
    from tests.integration.data_server import make_image

    blobs = []
    for i in range(n):
        buf = io.BytesIO()
        make_image(i, (64, 64)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    start = time.perf_counter()
    for blob in blobs:
        hash_image(blob, cfg.hash_size, cfg.crop_scale, cfg.crop_grid)
    return n / (time.perf_counter() - start)


def main() -> None:
    web = dict(remove_near=True, crop_grid=3, overlap_threshold=8)  # the presets' web-data settings
    for budget in (section("dedup").exact_nearest_max_pairs, 0):
        print(f"exact_nearest_max_pairs = {budget:,} (0: index only, no all-pairs search)")
        table(section("dedup", exact_nearest_max_pairs=budget, **web), "" if budget else "-index-only")
    cfg = section("dedup", **web)
    rate = hash_throughput(cfg, 100 if quick() else 500)
    print(f"decode + 10 pHashes at 64x64: {rate:.0f} images/s per process")
    emit("data_dedup", "hash-64px", "dalle", "images/s", rate, note="decode + sha256 + 10 pHashes")


def table(cfg: Dedup, suffix: str) -> None:
    sizes = (2_000, 5_000) if quick() else (10_000, 20_000, 50_000, 100_000)
    print(f"{'images':>8} {'dups s':>8} {'overlap s':>10} {'total s':>8} {'x time':>7} "
          f"{'x size':>7} {'removed':>8} {'val overlap':>11}")
    base = None
    for n in sizes:
        t_dup, t_over, removed, overlapping = time_dedup(n, cfg)
        total = t_dup + t_over
        base = base or (n, total)
        print(f"{n:>8} {t_dup:>8.2f} {t_over:>10.2f} {total:>8.2f} {total / base[1]:>7.1f} "
              f"{n / base[0]:>7.1f} {removed:>8} {overlapping:>11}")
        emit("data_dedup", f"{n // 1000}k{suffix}", "dalle", "s", total, higher_is_better=False,
             note=f"dups {t_dup:.1f}s + overlap {t_over:.1f}s; 10 hashes/img")


if __name__ == "__main__":
    main()
