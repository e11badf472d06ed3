"""Rendering of synthetic scene specs: anti-aliased shapes on a tinted background.

Shapes are drawn with PIL at SUPERSAMPLE x the output size and box-filtered down (area
averaging = anti-aliasing). `jitter` perturbs position (fraction of a quarter image), size,
rotation and colour; `tint` shifts the light-grey background per channel. Geometry is relative to
the image size, so any resolution renders the same scene.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dalle.data.synthetic_captions import PALETTE

SUPERSAMPLE = 4
BACKGROUND = (232, 232, 228)
# object "radius" as a fraction of the image side; every shape of radius r has an area close
# to a circle of radius r (square half-side 0.9 r, triangle circumradius 1.3 r). At the default
# 96 px and 8 px per dVAE cell a small object spans 24 px (3 cells), a large one ~35 px (~4.3
# cells): the dVAE keeps the shape of objects of about 3 cells or more, and loses it under 2
# (docs/decisions.md, "The world at 96 px").
RADIUS = {"small": 0.125, "large": 0.18}
# top / bottom sit 0.27 from the border so that a large triangle's apex stays inside the image
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.27),
           "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
# three objects "from left to right" zig-zag so that three large shapes never touch
ROW_ANCHORS = ((0.2, 0.28), (0.5, 0.72), (0.8, 0.28))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radius, start = 4, 0.9 * r * math.sqrt(2), math.pi / 4
    else:  # triangle, apex up
        corners, radius, start = 3, 1.3 * r, -math.pi / 2
    return [(cx + radius * math.cos(start + angle + 2 * math.pi * k / corners),
             cy + radius * math.sin(start + angle + 2 * math.pi * k / corners))
            for k in range(corners)]


def place(spec: dict[str, Any], size: int, rng: np.random.Generator,
          jitter: float) -> list[dict[str, Any]]:
    """Objects with pixel geometry: x, y (centre), r (radius), angle (radians), rgb."""
    placed = []
    row = spec["relation"] == "row"
    for k, obj in enumerate(spec["objects"]):
        ax, ay = ROW_ANCHORS[k] if row else ANCHORS[obj["position"]]
        dx, dy = rng.uniform(-jitter, jitter, 2) * 0.25 * size * 0.4
        r = RADIUS[obj["size"]] * size * (1 + rng.uniform(-jitter, jitter) * 0.3)
        angle = math.radians(rng.uniform(-jitter, jitter) * 20)
        rgb = np.clip(np.array(PALETTE[obj["colour"]]) + rng.uniform(-jitter, jitter, 3) * 80,
                      0, 255).round().astype(int)
        placed.append(dict(obj, x=round(float(ax * size + dx), 2),
                           y=round(float(ay * size + dy), 2), r=round(float(r), 2),
                           angle=round(float(angle), 4),
                           rgb=[int(v) for v in rgb]))
    return placed


def render(placed: list[dict[str, Any]], size: int, rng: np.random.Generator,
           tint: float) -> Image.Image:
    """Draw placed objects at SUPERSAMPLE x size, then box-downsample to [size, size] RGB."""
    k = SUPERSAMPLE
    bg = np.clip(np.array(BACKGROUND) + rng.uniform(-tint, tint, 3) * 255, 0, 255).round()
    canvas = Image.new("RGB", (size * k, size * k), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(canvas)
    for obj in placed:
        cx, cy, r, fill = obj["x"] * k, obj["y"] * k, obj["r"] * k, tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r, obj["angle"]), fill=fill)
    return canvas.reduce(k)  # box filter: the mean of each k x k block
