"""Samples for fixed captions during prior training: a PNG grid (dVAE-decoded when it exists)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from dalle.io import atomic_path
from dalle.models.transformer import DalleTransformer
from dalle.sample import sample_image_tokens
from dalle.train.prior_data import TokenSet

log = logging.getLogger(__name__)


def image_grid(images: torch.Tensor, cols: int) -> Image.Image:
    """images float [B, 3, H, W] in [0, 1] -> one PIL grid, `cols` per row, in order."""
    b, _, h, w = images.shape
    rows = -(-b // cols)
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    pix = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = pix[i]
    return Image.fromarray(canvas)


def tokens_as_images(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Without a dVAE: show each token id as a grey level, [B, N] -> [B, 3, grid, grid]."""
    side = int(round(tokens.shape[1] ** 0.5))
    grey = tokens.float().view(-1, 1, side, side) / max(1, vocab - 1)
    return grey.expand(-1, 3, -1, -1)


def decode_tokens(tokens: torch.Tensor, dvae: Optional[Any], vocab: int) -> torch.Tensor:
    return dvae.decode(tokens.cpu()).float() if dvae is not None else tokens_as_images(tokens, vocab)


def log_samples(model: DalleTransformer, val: TokenSet, models: Path, tracker: Any, step: int,
                n_captions: int = 4, n_per_caption: int = 2) -> Optional[Path]:
    """Sample n_per_caption images for the first val captions; log the grid as an artifact."""
    dvae = None
    if (models / "dvae.safetensors").is_file():
        from dalle.models.dvae import load_dvae

        try:
            dvae = load_dvae(models / "dvae.safetensors")
        except Exception as exc:  # noqa: BLE001 - a broken dVAE must not stop training
            log.warning("sample grid without dVAE decoding: %s", exc)
    k = min(n_captions, len(val))
    gen = torch.Generator(device=model.head.weight.device).manual_seed(step)
    tokens = sample_image_tokens(model, val.text_tokens[:k], val.text_lengths[:k], n_per_caption,
                                 batch_size=k * n_per_caption, generator=gen)
    grid = image_grid(decode_tokens(tokens, dvae, model.image_vocab), n_per_caption)
    path = Path(models) / ".prior_samples" / f"step_{step:07d}.png"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    tracker.log_artifact(path, "samples")
    tracker.log_dict({"step": step, "captions": val.captions[:k]}, f"samples/step_{step:07d}.json")
    model.train()
    return path
