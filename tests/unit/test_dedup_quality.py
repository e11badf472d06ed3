"""Dedup quality on injected near-duplicates : recall and precision >= 0.95, printed.

Distinct pictures (random shapes on tinted backgrounds) get copies that are cropped (up to 10% of
each side, anywhere), resized (x0.5..x1.5 and back), JPEG re-encoded (quality 50..95) or
brightness-shifted (+-15%). A removed image counts as a true positive when its `dup_of` is a
copy of the same picture.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance

from tests.helpers import section
from dalle.data.dedup import find_duplicates, find_overlap, hash_image
from tests.integration.data_server import make_image

SIZE = 96
KINDS = ("crop", "resize", "jpeg", "brightness")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def transform(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "crop":
        cut = int(SIZE * rng.uniform(0.0, 0.10))
        left, top = (int(v) for v in rng.integers(0, cut + 1, 2))
        return img.crop((left, top, left + SIZE - cut, top + SIZE - cut)).resize((SIZE, SIZE))
    if kind == "resize":
        side = int(SIZE * rng.uniform(0.5, 1.5))
        return img.resize((side, side), Image.Resampling.BICUBIC).resize((SIZE, SIZE))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(50, 96)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))


def _dataset(n_pictures: int, seed: int = 0) -> tuple[list[bytes], np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images, groups, kinds = [], [], []
    for pic in range(n_pictures):
        original = make_image(1000 + pic, (SIZE, SIZE))
        images.append(_png(original)), groups.append(pic), kinds.append("original")
        if pic % 2 == 0:  # half the pictures get one copy of each kind
            for kind in KINDS:
                images.append(_png(transform(original, kind, rng))), groups.append(pic)
                kinds.append(kind)
    return images, np.array(groups), kinds


def test_near_duplicate_recall_and_precision():
    cfg = section("dedup", remove_near=True, crop_grid=3, overlap_threshold=8)  # the web-data settings of the presets
    images, groups, kinds = _dataset(160)
    hashed = [hash_image(data, cfg.hash_size, cfg.crop_scale, cfg.crop_grid) for data in images]
    shas, bits = [h[0] for h in hashed], np.stack([h[1] for h in hashed])  # bits [N, K+1, B]
    dup_of, _ = find_duplicates(shas, bits, cfg.near_threshold)
    first = {g: i for i, g in reversed(list(enumerate(groups)))}
    positives = {i for i, g in enumerate(groups) if first[g] != i}
    removed = {i for i, d in enumerate(dup_of) if d is not None}
    true_pos = {i for i in removed if groups[dup_of[i]] == groups[i]}
    recall, precision = len(true_pos) / len(positives), len(true_pos) / max(1, len(removed))
    per_kind = {k: np.mean([i in true_pos for i in positives if kinds[i] == k]) for k in KINDS}
    print(f"\ndedup near-duplicates: recall {recall:.3f} precision {precision:.3f} "
          f"({len(true_pos)}/{len(positives)} found, {len(removed)} removed) per kind "
          + " ".join(f"{k}={v:.2f}" for k, v in per_kind.items()))
    assert recall >= 0.95 and precision >= 0.95

    # val = the copies + unrelated pictures; train = the originals
    originals = [i for i, k in enumerate(kinds) if k == "original"]
    copies = [i for i, k in enumerate(kinds) if k != "original"]
    fresh = np.stack([hash_image(_png(make_image(9000 + i, (SIZE, SIZE))), cfg.hash_size,
                                 cfg.crop_scale, cfg.crop_grid)[1] for i in range(80)])
    val_bits = np.concatenate([bits[copies], fresh])
    table = find_overlap([str(i) for i in copies] + [f"fresh{i}" for i in range(80)], val_bits,
                         [str(i) for i in originals], bits[originals], cfg.overlap_threshold,
                         "hamming")
    flags = table["overlap"].to_numpy()
    hit = [groups[int(t)] == groups[int(v)] if ok else False
           for v, t, ok in zip(table["val_key"][:len(copies)], table["train_key"], flags)]
    overlap_recall, overlap_precision = np.mean(hit), sum(hit) / max(1, int(flags.sum()))
    print(f"val->train overlap: recall {overlap_recall:.3f} precision {overlap_precision:.3f} "
          f"({int(flags[len(copies):].sum())} of 80 unrelated val images flagged)")
    assert overlap_recall >= 0.95 and overlap_precision >= 0.95
