"""The oracle reads fresh and degraded synthetic images; wrong captions are caught per attribute."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle.config import load_params
from dalle.data.synthetic import scene
from dalle.errors import DataError
from dalle.eval.oracle import parse, score
from tests.conftest import REPO

N = 200


@pytest.fixture(scope="module")
def scenes():
    data = load_params(REPO / "params.yaml", overrides=["data.synthetic.max_objects=3"]).data
    return [scene(data.synthetic, data.image_size, i, 0) for i in range(N)]


def _jpeg(img: Image.Image, quality: int = 50) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _noise(img: Image.Image, seed: int) -> np.ndarray:
    arr = np.asarray(img).astype(float) + np.random.default_rng(seed).normal(0, 12, np.asarray(img).shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


DEGRADE = {"clean": lambda im, i: im,
           "blur1.0": lambda im, i: im.filter(ImageFilter.GaussianBlur(1.0)),
           "noise12": _noise,
           "jpeg50": lambda im, i: _jpeg(im)}
FLOOR = {"clean": 0.99, "blur1.0": 0.95, "noise12": 0.95, "jpeg50": 0.75}


@pytest.mark.parametrize("kind", list(DEGRADE))
def test_oracle_accuracy(scenes, kind):
    hits = [score(spec, DEGRADE[kind](img, i))["all_correct"]
            for i, (spec, _text, _placed, img) in enumerate(scenes)]
    acc = float(np.mean(hits))
    print(f"oracle all-correct on {kind} images: {acc:.3f} (n={len(hits)})")
    assert acc >= FLOOR[kind]


def test_caption_scoring_matches_spec_scoring(scenes):
    for spec, text, _placed, img in scenes[:60]:
        assert score(text, img)["all_correct"] == score(spec, img)["all_correct"]


def test_parse_positions_and_float_input(scenes):
    spec, _text, placed, img = next(s for s in scenes if len(s[0]["objects"]) == 2)
    objs = parse(np.asarray(img).astype(np.float32) / 255.0)
    assert len(objs) == 2
    for obj, want in zip(objs, sorted(placed, key=lambda p: p["x"])):
        side = img.size[0]
        assert abs(obj.x * side - want["x"]) < 1.5 and abs(obj.y * side - want["y"]) < 1.5


@pytest.mark.parametrize("attr,swap", [("colour", {"red": "blue", "blue": "red", "green": "yellow",
                                                   "yellow": "green", "purple": "orange", "orange": "purple"}),
                                       ("shape", {"circle": "square", "square": "triangle", "triangle": "circle"}),
                                       ("size", {"small": "large", "large": "small"})])
def test_wrong_attribute_is_caught(scenes, attr, swap):
    for spec, _text, _placed, img in scenes[:40]:
        if len(spec["objects"]) != 1:
            continue
        wrong = {"objects": [dict(spec["objects"][0], **{attr: swap[spec["objects"][0][attr]]})],
                 "relation": None}
        result = score(wrong, img)
        assert not result["all_correct"] and not result[attr] and result["count"]


def test_wrong_relation_count_and_position_are_caught(scenes):
    for spec, _text, _placed, img in scenes:
        if spec["relation"] == "left of":
            flipped = dict(spec, relation="right of")
            assert not score(flipped, img)["position"]
        if spec["relation"] is None:
            other = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
                     "centre": "left"}[spec["objects"][0]["position"]]
            moved = {"objects": [dict(spec["objects"][0], position=other)], "relation": None}
            assert not score(moved, img)["position"]
            doubled = {"objects": spec["objects"] * 2, "relation": "pair"}
            assert not score(doubled, img)["count"]
    blank = Image.new("RGB", (64, 64), (230, 230, 230))
    assert score("a small red circle on the left", blank)["n_found"] == 0


def test_unreadable_inputs_are_one_line():
    with pytest.raises(DataError, match="cannot read a scene"):
        score("a photograph of nothing", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(DataError, match=r"\[H, W, 3\]"):
        parse(np.zeros((64, 64), np.uint8))


def test_size_split_sits_in_the_measured_gap(scenes):
    """SIZE_SPLIT is a measurement: the radius it reads on the originals (area over the shape's
    area per r^2) must leave a clear gap between small and large, with the split inside it."""
    import math

    from dalle.eval import oracle

    radii: dict[str, list[float]] = {"small": [], "large": []}
    for spec, _text, _placed, img in scenes:
        objs = parse(img)
        if len(objs) != len(spec["objects"]):
            continue
        for obj, want in zip(oracle._match(objs, spec), spec["objects"]):
            radii[want["size"]].append(math.sqrt(obj.area / oracle.AREA_PER_R2[obj.shape]))
    small, large = max(radii["small"]), min(radii["large"])
    gap = large - small
    print(f"read radius / side: small <= {small:.4f}, large >= {large:.4f}, split {oracle.SIZE_SPLIT}")
    assert gap > 0.02
    assert small + 0.3 * gap < oracle.SIZE_SPLIT < large - 0.3 * gap
