"""Image arrays and tensors: the one place that converts between them and draws grids.

Conventions: images at rest are uint8 [N, H, W, 3] (numpy); models take float [N, 3, H, W] in
[0, 1] (torch). Everything that decodes, encodes, scores or saves pictures goes through here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.errors import DataError
from dalle.io import atomic_path

log = logging.getLogger(__name__)
ArrayLike = Union[np.ndarray, torch.Tensor]


def to_float(images: ArrayLike, fmt: Optional[torch.memory_format] = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1], in memory format `fmt` (None: the
    permuted view's own layout, i.e. channels-last strides; convolutions pick their kernels by
    layout, so each caller keeps the one it was measured with)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"expected uint8 images [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (clamped, rounded)."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def as_rgb_uint8(images: np.ndarray, size: Optional[int], what: str) -> np.ndarray:
    """Check/convert an image batch to uint8 [N, size, size, 3] (docs/decisions.md, dVAE input).

    Grey or RGBA images are converted to RGB and images of another size are resized (bilinear,
    antialiased), each with a warning; other dtypes or channel counts are refused in one line.
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise DataError(f"{what} images have dtype {arr.dtype}; expected uint8 [N, H, W, 3]")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise DataError(f"{what} images have shape {arr.shape}; expected [N, H, W, 3] (RGB)")
    if arr.shape[-1] != 3:
        log.warning("%s images have %d channels; converting to RGB", what, arr.shape[-1])
        arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
    if size is not None and arr.shape[1:3] != (size, size):
        log.warning("%s images are %dx%d; resizing to the dVAE's %dx%d", what, arr.shape[1],
                    arr.shape[2], size, size)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        arr = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(arr)


def tokens_as_grey(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Image tokens shown without a dVAE: each id as a grey level, [B, N] -> [B, 3, grid, grid]."""
    side = int(round(tokens.shape[1] ** 0.5))
    grey = tokens.float().view(-1, 1, side, side) / max(1, vocab - 1)
    return grey.expand(-1, 3, -1, -1)


def grid(images: np.ndarray, cols: int, gap: int = 0, fill: int = 255) -> Image.Image:
    """uint8 [N, H, W, 3] -> one picture, `cols` per row in order, `gap` pixels of `fill` between
    cells (and in the cells of an unfinished last row)."""
    n, h, w, _ = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), fill, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
    return Image.fromarray(canvas)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
