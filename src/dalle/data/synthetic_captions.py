"""The synthetic world's vocabulary, its scene specs, their captions, and caption -> spec parsing.

A scene spec is a JSON-able dict `{"objects": [{"colour", "shape", "size", "position"}, ...],
"relation": None | "left of" | "right of" | "above" | "below" | "pair" | "row"}`. Objects are
listed in the order the caption mentions them. Positions follow from the relation:
* 1 object: any of left/right/top/bottom/centre, said in the caption ("... at the top");
* 2 objects: "a red circle to the left of a blue square" (A left, B right), "above"/"below"
  (top/bottom), or "pair": "two small green triangles" (same colour, shape, size; side by side);
* 3 objects: "row": "a red circle, a blue square and a green triangle from left to right".
The attribute space is deliberately modest (6 colours x 3 shapes x 2 sizes x 5 positions) so a
small prior can learn it on 2 cores; every scored attribute is stated unambiguously.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

# colour name -> sRGB; well separated in hue so blurred / noisy images still read correctly
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 84, 214),
    "yellow": (236, 206, 30), "purple": (140, 60, 180), "orange": (247, 127, 14)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
# relation -> positions of (first-mentioned, second-mentioned) object
RELATION_POSITIONS = {"left of": ("left", "right"), "right of": ("right", "left"),
                      "above": ("top", "bottom"), "below": ("bottom", "top")}

SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",)}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {"left": ("on the left", "at the left"),
                    "right": ("on the right", "at the right"),
                    "top": ("at the top", "near the top"),
                    "bottom": ("at the bottom", "near the bottom"),
                    "centre": ("in the centre", "in the middle")}
RELATION_PHRASES = {"left of": ("to the left of", "left of"),
                    "right of": ("to the right of", "right of"),
                    "above": ("above", "over"), "below": ("below", "under")}
SINGLE_TEMPLATES = ("a {o} {p}", "there is a {o} {p}", "{p} there is a {o}",
                    "a picture of a {o} {p}")
PAIR_TEMPLATES = ("a {a} {r} a {b}", "there is a {a} {r} a {b}", "an image of a {a} {r} a {b}")
TWIN_TEMPLATES = ("two {o}", "there are two {o}", "a picture of two {o}")
ROW_TEMPLATES = ("a {a}, a {b} and a {c} from left to right",
                 "from left to right: a {a}, a {b} and a {c}")


def combo(obj: dict[str, Any]) -> str:
    """The "colour shape" pair of an object (what `data.synthetic.holdout` lists)."""
    return f"{obj['colour']} {obj['shape']}"


def _obj(rng: np.random.Generator, position: str) -> dict[str, Any]:
    return {"colour": COLOURS[rng.integers(len(COLOURS))],
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "size": SIZES[rng.integers(len(SIZES))], "position": position}


def sample_spec(rng: np.random.Generator, min_objects: int, max_objects: int) -> dict[str, Any]:
    """Draw one scene spec (objects in caption order, positions implied by the relation)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    if n == 1:
        return {"objects": [_obj(rng, POSITIONS[rng.integers(len(POSITIONS))])], "relation": None}
    if n == 3:
        return {"objects": [_obj(rng, p) for p in ("left", "centre", "right")], "relation": "row"}
    if rng.random() < 0.25:  # two identical objects side by side or stacked
        first, second = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
        a = _obj(rng, first)
        return {"objects": [a, dict(a, position=second)], "relation": "pair"}
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    pa, pb = RELATION_POSITIONS[relation]
    return {"objects": [_obj(rng, pa), _obj(rng, pb)], "relation": relation}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _phrase(rng: np.random.Generator, obj: dict[str, Any], plural: bool = False) -> str:
    shape = _pick(rng, SHAPE_WORDS[obj["shape"]])
    shape = shape + ("es" if shape.endswith("x") else "s") if plural else shape
    return f"{_pick(rng, SIZE_WORDS[obj['size']])} {obj['colour']} {shape}"


def caption(spec: dict[str, Any], rng: np.random.Generator) -> str:
    """An English caption for the spec, from several templates and synonyms (lower case)."""
    objs, relation = spec["objects"], spec["relation"]
    if relation is None:
        text = _pick(rng, SINGLE_TEMPLATES).format(
            o=_phrase(rng, objs[0]), p=_pick(rng, POSITION_PHRASES[objs[0]["position"]]))
    elif relation == "pair":
        text = _pick(rng, TWIN_TEMPLATES).format(o=_phrase(rng, objs[0], plural=True))
    elif relation == "row":
        text = _pick(rng, ROW_TEMPLATES).format(a=_phrase(rng, objs[0]), b=_phrase(rng, objs[1]),
                                                c=_phrase(rng, objs[2]))
    else:
        text = _pick(rng, PAIR_TEMPLATES).format(a=_phrase(rng, objs[0]), b=_phrase(rng, objs[1]),
                                                 r=_pick(rng, RELATION_PHRASES[relation]))
    return text


# ----------------------------------------------------------------------------- caption -> spec
_WORD_TO = {w: ("shape", s) for s, ws in SHAPE_WORDS.items() for w in ws}
_WORD_TO.update({w + ("es" if w.endswith("x") else "s"): ("shapes", s)
                 for s, ws in SHAPE_WORDS.items() for w in ws})
_WORD_TO.update({w: ("size", s) for s, ws in SIZE_WORDS.items() for w in ws})
_WORD_TO.update({c: ("colour", c) for c in COLOURS})
_REL_RE = [(rel, re.compile(r"\b(" + "|".join(re.escape(p) for p in ps) + r")\b"))
           for rel, ps in RELATION_PHRASES.items()]
_POS_RE = [(pos, re.compile(r"\b(" + "|".join(re.escape(p) for p in ps) + r")\b"))
           for pos, ps in POSITION_PHRASES.items()]


def _objects_in(text: str) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    for word in re.findall(r"[a-z]+", text):
        kind, value = _WORD_TO.get(word, (None, None))
        if kind in ("colour", "size"):
            pending[kind] = value
        elif kind in ("shape", "shapes"):
            obj = {"colour": pending.get("colour"), "shape": value, "size": pending.get("size"),
                   "position": None}
            objs += [obj, dict(obj)] if kind == "shapes" else [obj]
            pending = {}
    return objs


def parse_caption(text: str) -> Optional[dict[str, Any]]:
    """Caption -> spec (positions filled from the relation); None if it names no object."""
    text = text.lower()
    objs = _objects_in(text)
    if not objs:
        return None
    if len(objs) == 3:
        for obj, pos in zip(objs, ("left", "centre", "right")):
            obj["position"] = pos
        return {"objects": objs, "relation": "row"}
    if len(objs) == 2 and objs[0] == objs[1] and not any(r.search(text) for _, r in _REL_RE):
        return {"objects": objs, "relation": "pair"}
    if len(objs) == 2:
        found = [(m.start(), rel) for rel, r in _REL_RE for m in [r.search(text)] if m]
        relation = min(found)[1] if found else None
        if relation:
            for obj, pos in zip(objs, RELATION_POSITIONS[relation]):
                obj["position"] = pos
        return {"objects": objs, "relation": relation}
    found = [(m.start(), pos) for pos, r in _POS_RE for m in [r.search(text)] if m]
    if found and len(objs) == 1:
        objs[0]["position"] = min(found)[1]
    return {"objects": objs, "relation": None}
