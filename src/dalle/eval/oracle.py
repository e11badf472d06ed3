"""The synthetic world's oracle: reads objects off an image and scores it against a caption/spec.

`parse(image)` estimates the background from the border, labels connected components of the
foreground, and reads each component's colour (nearest palette entry in CIELAB, from its most
saturated pixels), size (equivalent radius vs the image side), shape (farthest-pixel distance over
equivalent radius: circle ~1.0, square ~1.25, triangle ~1.55; rotation invariant) and position.
It is meant for blurry / noisy images too (dVAE reconstructions, generated samples), so every
threshold sits halfway between the classes. `score` matches parsed objects to the spec's objects
and reports per-attribute correctness (count, colour, shape, size, position) and `all_correct`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import numpy as np
from scipy import ndimage

from dalle.data.synthetic_captions import PALETTE, parse_caption
from dalle.data.synthetic_render import ANCHORS
from dalle.errors import DataError

MIN_AREA_FRAC = 0.003  # components smaller than this fraction of the image are noise
# A shape's area in units of its radius r squared, from the renderer's geometry (square half-side
# 0.9 r, triangle circumradius 1.3 r): size is read as the radius r = sqrt(area / AREA_PER_R2),
# so a small square and a large triangle, whose areas differ by less than their radii, stay apart.
AREA_PER_R2 = {"circle": math.pi, "square": (2 * 0.9) ** 2, "triangle": 3 * math.sqrt(3) / 4 * 1.3 ** 2}
SIZE_SPLIT = 0.15  # radius / side read on 2,000 originals at 96 px: small 0.117-0.133, large 0.169-0.191
RELATION_MARGIN = 0.05  # of the image side, for "left of" / "above" / "row" orderings
ATTRIBUTES = ("count", "colour", "shape", "size", "position")  # what `score` checks; all_correct = all of them


@dataclass(frozen=True)
class Object:
    shape: str
    colour: str
    size: str
    x: float  # centroid, fraction of the width
    y: float  # centroid, fraction of the height
    area: float  # fraction of the image


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8/float [..., 3] -> CIELAB (D65) [..., 3]."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                        [0.0193, 0.1192, 0.9505]]).T / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


_NAMES = tuple(PALETTE)
_PALETTE_LAB = _lab(np.array([PALETTE[n] for n in _NAMES]))  # [C, 3]


def _as_array(image: Any) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(f"oracle expects an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:  # float images in [0, 1]
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr


def _contrast(lab: np.ndarray) -> np.ndarray:
    """Lab distance [H, W] from the median border colour (the background estimate)."""
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])  # [4S, 3]
    dist = np.linalg.norm(lab - np.median(border, axis=0), axis=-1)  # [H, W]
    return ndimage.gaussian_filter(dist, 0.7, mode="nearest")  # JPEG ringing


def _refine(seed: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """A component's mask at half its own peak contrast: the true edge under blur."""
    peak = np.percentile(dist[seed], 90)
    grown = ndimage.binary_dilation(seed, iterations=2)
    mask = grown & (dist > 0.5 * peak)
    return ndimage.binary_fill_holes(mask)


def _component(mask: np.ndarray, lab: np.ndarray, h: int, w: int,
               origin: tuple[int, int]) -> Optional[Object]:
    """Read one component; `mask`/`lab` are a crop whose top-left is `origin` in the image."""
    ys, xs = np.nonzero(mask)
    area = len(ys)
    side = math.sqrt(h * w)
    r_eq = math.sqrt(area / math.pi)
    cy, cx = ys.mean(), xs.mean()
    far = math.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max()) + 0.5  # + half a pixel
    ratio = far / max(r_eq, 1e-6)  # circle ~1.05, square ~1.23, triangle ~1.42
    fill = area / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # of the box: 0.79, ~0.95, ~0.6
    drop = (cy - ys.min() + 0.5) / (np.ptp(ys) + 1)  # centroid depth: 0.5, 0.5, ~0.62 (apex up)
    tri = (0.70 - fill) / 0.08 + (ratio - 1.33) / 0.08 + (drop - 0.545) / 0.02
    sq = (fill - 0.86) / 0.06 + (ratio - 1.14) / 0.05
    shape = "triangle" if tri > 0 else "square" if sq > 0 else "circle"
    chroma = np.hypot(lab[ys, xs, 1], lab[ys, xs, 2])  # most saturated half: away from edges
    core = lab[ys, xs][chroma >= np.median(chroma)]
    colour = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - np.median(core, axis=0), axis=-1)))]
    size = "small" if math.sqrt(area / AREA_PER_R2[shape]) / side < SIZE_SPLIT else "large"
    return Object(shape, colour, size, float((cx + origin[1] + 0.5) / w),
                  float((cy + origin[0] + 0.5) / h), area / (h * w))


def parse(image: Any) -> list[Object]:
    """Objects in an RGB image (uint8 [H, W, 3], float [0, 1] or PIL), sorted left to right."""
    arr = _as_array(image)
    h, w = arr.shape[:2]
    lab = _lab(arr)  # [H, W, 3]
    dist = _contrast(lab)
    mask = ndimage.binary_opening(dist > 22.0, structure=np.ones((2, 2)))  # ~half the weakest
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))  # palette contrast (~40 dE)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    objs = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or sizes[i] < MIN_AREA_FRAC * h * w:
            continue
        crop = tuple(slice(max(0, b.start - 3), b.stop + 3) for b in box)  # room for _refine
        origin = (crop[0].start, crop[1].start)
        objs.append(_component(_refine(labels[crop] == i, dist[crop]), lab[crop], h, w, origin))
    return sorted((o for o in objs if o is not None), key=lambda o: (o.x, o.y))


def position_of(obj: Object) -> str:
    """Nearest of the world's five anchor positions."""
    return min(ANCHORS, key=lambda p: (ANCHORS[p][0] - obj.x) ** 2 + (ANCHORS[p][1] - obj.y) ** 2)


def _relation_ok(relation: Optional[str], objs: list[Object], spec_objs: list[dict]) -> bool:
    m = RELATION_MARGIN
    if relation in (None, "pair"):
        if relation is None and spec_objs and spec_objs[0].get("position"):
            return position_of(objs[0]) == spec_objs[0]["position"]
        return True
    if relation == "row":
        return all(b.x - a.x > m for a, b in zip(objs, objs[1:]))
    a, b = objs
    return {"left of": b.x - a.x > m, "right of": a.x - b.x > m,
            "above": b.y - a.y > m, "below": a.y - b.y > m}[relation]


def _match(objs: list[Object], spec: dict) -> list[Object]:
    """The ordering of parsed objects that agrees best with the spec (attributes, then layout)."""
    want = spec["objects"]

    def agree(perm: Any) -> tuple[int, bool]:
        attrs = sum((o.colour == s["colour"]) + (o.shape == s["shape"]) + (o.size == s["size"])
                    for o, s in zip(perm, want))
        return attrs, _relation_ok(spec.get("relation"), list(perm), want)
    return list(max(itertools.permutations(objs), key=agree))


def score(spec_or_caption: Union[str, dict], image: Any) -> dict[str, Any]:
    """Per-attribute correctness of `image` against a spec dict or a caption of the world."""
    spec = parse_caption(spec_or_caption) if isinstance(spec_or_caption, str) else spec_or_caption
    if not spec or not spec.get("objects"):
        raise DataError(f"oracle cannot read a scene from {str(spec_or_caption)[:80]!r}")
    want = spec["objects"]
    objs = parse(image)
    result: dict[str, Any] = {"count": len(objs) == len(want), "n_found": len(objs)}
    if result["count"]:
        objs = _match(objs, spec)
        for attr in ("colour", "shape", "size"):
            result[attr] = all(s[attr] is None or getattr(o, attr) == s[attr]
                               for o, s in zip(objs, want))
        result["position"] = _relation_ok(spec.get("relation"), objs, want)
    else:
        result.update(colour=False, shape=False, size=False, position=False)
    result["all_correct"] = all(result[k] for k in ATTRIBUTES)
    result["objects"] = [asdict(o) for o in objs]
    return result
