"""Samples for fixed captions during prior training: a PNG grid (dVAE-decoded when it exists)."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from dalle.catalog import Artefacts
from dalle.errors import DalleError
from dalle.models.dvae import DiscreteVAE, load_dvae
from dalle.models.transformer import DalleTransformer
from dalle.pixels import grid, save_png, to_uint8, tokens_as_grey
from dalle.sample import sample_image_tokens
from dalle.train.prior_data import TokenSet

log = logging.getLogger(__name__)


def _dvae(art: Artefacts) -> Optional[DiscreteVAE]:
    """The trained dVAE when there is one (a broken one must not stop training: grey tokens)."""
    if not art.dvae.is_file():
        return None
    try:
        return load_dvae(art.dvae)
    except DalleError as exc:
        log.warning("sample grid without dVAE decoding: %s", exc.one_line())
        return None


def log_samples(model: DalleTransformer, val: TokenSet, art: Artefacts, tracker: Any, step: int,
                n_captions: int = 4, n_per_caption: int = 2) -> Any:
    """Sample n_per_caption images for the first val captions; log the grid as an artifact."""
    dvae = _dvae(art)
    k = min(n_captions, len(val))
    gen = torch.Generator(device=model.head.weight.device).manual_seed(step)
    tokens = sample_image_tokens(model, val.text_tokens[:k], val.text_lengths[:k], n_per_caption,
                                 batch_size=k * n_per_caption, generator=gen)
    images = dvae.decode(tokens.cpu()).float() if dvae is not None else tokens_as_grey(tokens, model.image_vocab)
    path = save_png(grid(to_uint8(images), cols=n_per_caption), art.prior_samples / f"step_{step:07d}.png")
    tracker.log_artifact(path, "samples")
    tracker.log_dict({"step": step, "captions": val.captions[:k]}, f"samples/step_{step:07d}.json")
    model.train()
    return path
