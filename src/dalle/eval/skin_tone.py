"""A model-free check of the held-out attribute on real drawings: the skin tone of a figure.

Nothing here is learned. `measure_palette` reads the drawings themselves: for each of the five
Fitzpatrick tones, the exact RGB colour whose share of the pixels of that tone's drawings most
exceeds its share in any other tone's drawings (the skin fill, since the drawings of one figure
differ only there). `tone_of` reads one image: every pixel within `RADIUS` (RGB distance, 0-255)
of a skin colour votes for its nearest one; the tone with the most votes wins if it covers at
least `MIN_FRACTION` of the image, else the image shows no skin ("none", always wrong).
`score(spec, image)` compares that with the tone the caption asked for (the spec that
`dalle.data.openmoji` writes beside each seen/held-out evaluation caption).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
# Chosen on the 32 px train drawings themselves (share of toned drawings read as their tone):
# radius 40 / 1%: 0.67 (the outline's anti-aliased edge passes for "dark"), 30 / 0.5%: 0.85,
# 20 / 0.5%: 0.90, 10 / 0.2%: 0.93 (too strict for decoded samples, whose colours are approximate).
RADIUS = 20.0  # RGB distance, 0-255; the five OpenMoji skin colours are 45-75 apart
MIN_FRACTION = 0.005  # of the image's pixels: 5 of 32x32, 20 of 64x64


def _packed(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int64 [H*W] (r << 16 | g << 8 | b)."""
    px = image.reshape(-1, 3).astype(np.int64)
    return (px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]


def measure_palette(images: dict[str, list[np.ndarray]]) -> dict[str, list[int]]:
    """tone -> [r, g, b]: each tone's most over-represented colour (module docstring). The images
    of each tone are uint8 [H, W, 3]; every tone needs at least one."""
    shares: dict[str, dict[int, float]] = {}
    for tone in TONES:
        if not images.get(tone):
            raise ValueError(f"no drawing of the {tone} skin tone to measure its colour on")
        colours, counts = np.unique(np.concatenate([_packed(i) for i in images[tone]]),
                                    return_counts=True)
        shares[tone] = dict(zip(colours.tolist(), (counts / counts.sum()).tolist()))
    palette = {}
    for tone in TONES:
        def excess(colour: int, tone: str = tone) -> float:
            return shares[tone][colour] - max(shares[o].get(colour, 0.0) for o in TONES if o != tone)
        best = max(shares[tone], key=excess)
        palette[tone] = [(best >> 16) & 255, (best >> 8) & 255, best & 255]
    return palette


def tone_of(image: np.ndarray, palette: dict[str, list[int]]) -> Optional[str]:
    """The skin tone an image shows (uint8 [H, W, 3]), or None when no skin colour covers
    MIN_FRACTION of it."""
    colours = np.array([palette[t] for t in TONES], dtype=np.float32)  # [5, 3]
    px = image.reshape(-1, 3).astype(np.float32)  # [P, 3]
    dist = np.linalg.norm(px[:, None, :] - colours[None, :, :], axis=2)  # [P, 5]
    nearest = dist.argmin(axis=1)
    votes = np.bincount(nearest[dist.min(axis=1) <= RADIUS], minlength=len(TONES))  # [5]
    if votes.max() < MIN_FRACTION * len(px):
        return None
    return TONES[int(votes.argmax())]


def score(spec: dict[str, Any], image: np.ndarray) -> dict[str, bool]:
    """{"skin_tone": the requested tone is the one shown, "skin_found": some skin is shown}."""
    found = tone_of(image, spec["palette"])
    return {"skin_tone": found == spec["tone"], "skin_found": found is not None}
