"""The model-free skin-tone check: the palette is read off the drawings, one image's tone is the
skin colour most of its pixels are near, and evaluate applies it only to captions whose spec asks
for it (the synthetic oracle keeps the others)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dalle.eval import skin_tone
from dalle.eval.evaluate import check, oracle_rows, summarise

SKIN = {"light": (250, 220, 188), "medium-light": (222, 187, 144), "medium": (193, 154, 101),
        "medium-dark": (165, 121, 57), "dark": (106, 70, 47)}
HAIR = (61, 61, 61)


def drawing(skin: tuple[int, int, int], area: int = 12, side: int = 32) -> np.ndarray:
    """A white image with a dark outline, hair, and a square of skin: uint8 [side, side, 3]."""
    img = np.full((side, side, 3), 255, np.uint8)
    img[4:6, 4:28] = 0
    img[6:10, 8:24] = HAIR
    img[10:10 + area, 10:10 + area] = skin
    return img


def test_the_palette_is_each_tones_own_colour() -> None:
    images = {t: [drawing(c), drawing(c, area=8)] for t, c in SKIN.items()}
    assert skin_tone.measure_palette(images) == {t: list(c) for t, c in SKIN.items()}


def test_a_tone_with_no_drawing_cannot_be_measured() -> None:
    with pytest.raises(ValueError, match="dark skin tone"):
        skin_tone.measure_palette({t: [drawing(c)] for t, c in SKIN.items() if t != "dark"})


def test_tone_of_reads_the_nearest_skin_colour_and_none_without_skin() -> None:
    palette = {t: list(c) for t, c in SKIN.items()}
    for tone, colour in SKIN.items():
        blurred = np.clip(drawing(colour).astype(int) + 9, 0, 255).astype(np.uint8)  # off by 9
        assert skin_tone.tone_of(blurred, palette) == tone
    assert skin_tone.tone_of(np.full((32, 32, 3), 255, np.uint8), palette) is None
    assert skin_tone.tone_of(drawing((0, 0, 255)), palette) is None  # blue is no skin


def test_evaluate_scores_skin_specs_and_reports_them_per_combo() -> None:
    palette = {t: list(c) for t, c in SKIN.items()}
    spec = lambda tone: json.dumps({"check": "skin_tone", "tone": tone, "palette": palette})  # noqa: E731
    images = np.stack([drawing(SKIN["dark"]), drawing(SKIN["light"]), drawing(SKIN["dark"])])
    specs = [spec("dark"), spec("dark"), None]
    assert check(specs[0], images[0]) == {"skin_tone": True, "skin_found": True, "all_correct": True}
    assert check(None, images[2]) is None
    rows = oracle_rows(images, specs, np.array(["holdout", "seen", "val"]), n=1)
    assert [(r["combo"], r["skin_tone"]) for r in rows] == [("holdout", 1.0), ("seen", 0.0)]

    class Ext:
        name = "x"
    out = summarise([], [], rows, Ext(), n_max=32)
    assert out["skin_tone_holdout_n1"] == 1.0 and out["skin_tone_seen_n1"] == 0.0
    assert not any(k.startswith("oracle_") for k in out)
