"""Held-out evaluation and saving of a trained dVAE: recon MSE, codebook usage, oracle accuracy."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from dalle.catalog import config_json
from dalle.data.synthetic_captions import parse_caption
from dalle.errors import DataError
from dalle.eval import oracle
from dalle.io import save_checkpoint, write_json
from dalle.models.dvae import DiscreteVAE, dvae_config_dict
from dalle.pixels import grid, save_png, to_float, to_uint8
from dalle.train.dvae_loss import usage_of

log = logging.getLogger("dalle.dvae")
ORACLE_LIMIT = 1000  # val images scored by the oracle (its cost is per image)


@torch.no_grad()
def reconstruct(model: DiscreteVAE, images: np.ndarray,
                batch_size: int = 256) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 [N, H, W, 3] -> (reconstructions uint8 [N, H, W, 3], argmax codes long [N, h*w])."""
    recs, codes = [], []
    for i in range(0, len(images), batch_size):
        x = to_float(torch.from_numpy(images[i:i + batch_size]), torch.contiguous_format)  # [B, 3, H, W]
        z = model.encode(x)  # [B, h*w], argmax (paper §2.2)
        recs.append(to_uint8(model.decode(z)))
        codes.append(z)
    return np.concatenate(recs), torch.cat(codes)


def synthetic_captions(captions: list[str]) -> bool:
    """Whether the captions describe the synthetic world (the oracle reads only that world)."""
    return bool(captions) and all(parse_caption(c) is not None for c in captions[:ORACLE_LIMIT])


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The fraction of oracle readings right overall ("all_correct") and per attribute."""
    return {k: float(np.mean([bool(r[k]) for r in rows])) for k in ("all_correct", *oracle.ATTRIBUTES)}


def colour_errors(images: np.ndarray, recs: np.ndarray, white: int = 232) -> np.ndarray:
    """Per image: the RGB distance (0-255) between the mean colour of the original's drawn pixels
    (any channel under `white`) and the mean colour of the reconstruction at those pixels ->
    float [N] (NaN for an all-white image). Catches colours lost where the MSE is small (a flag
    that comes back brown)."""
    mask = (images < white).any(axis=3)  # [N, H, W]
    count = mask.sum(axis=(1, 2))[:, None]  # [N, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        orig = (images * mask[..., None]).sum(axis=(1, 2)) / count  # [N, 3]
        rec = (recs.astype(np.float64) * mask[..., None]).sum(axis=(1, 2)) / count  # [N, 3]
    return np.linalg.norm(orig - rec, axis=1)


def recon_grid(path: Path, originals: np.ndarray, recons: np.ndarray, n: int = 10) -> Path:
    """PNG: the first n originals (top row) above their reconstructions (bottom row)."""
    n = min(n, len(originals))
    return save_png(grid(np.concatenate([originals[:n], recons[:n]]), cols=n, gap=2), path)


class _Tally:
    """Sums over the val batches: squared error, code counts, the oracle's readings of the
    first ORACLE_LIMIT reconstructions and originals (synthetic world), the grid's 8 images."""

    GRID = 10

    def __init__(self, vocab: int) -> None:
        self.sse, self.values, self.counts = 0.0, 0, torch.zeros(vocab, dtype=torch.float64)
        self.synthetic: Optional[bool] = None  # decided on the first batch's captions
        self.recon_rows: list[dict[str, Any]] = []
        self.original_rows: list[dict[str, Any]] = []
        self.colour: list[np.ndarray] = []  # per-image colour errors (colour_errors)
        self.originals: list[np.ndarray] = []
        self.recons: list[np.ndarray] = []

    def add(self, images: np.ndarray, captions: list[str], recs: np.ndarray, codes: torch.Tensor) -> None:
        diff = (recs.astype(np.float64) - images.astype(np.float64)) / 255
        self.sse += float((diff ** 2).sum())
        self.values += diff.size
        self.counts += torch.bincount(codes.reshape(-1), minlength=len(self.counts)).double()
        self.colour.append(colour_errors(images, recs))
        if self.synthetic is None:
            self.synthetic = synthetic_captions(list(captions))
        room = ORACLE_LIMIT - len(self.recon_rows) if self.synthetic else 0
        for i in range(min(room, len(captions))):  # scored now: no image is kept for it
            self.recon_rows.append(oracle.score(captions[i], recs[i]))
            self.original_rows.append(oracle.score(captions[i], images[i]))
        room = self.GRID - sum(len(o) for o in self.originals)
        if room > 0:
            self.originals.append(images[:room].copy())
            self.recons.append(recs[:room].copy())


def evaluate_dvae(model: DiscreteVAE, batches: Iterable[tuple[np.ndarray, list[str]]],
                  recon_png: Path, tracker: Any) -> dict[str, Any]:
    """Val reconstruction MSE, codebook usage, the oracle's per-attribute reading of the
    reconstructions (synthetic world only), and the originals-over-reconstructions PNG; the val
    split comes as (uint8 [B, H, W, 3], captions) batches, so memory does not grow with it."""
    tally = _Tally(model.vocab_size)
    for images, captions in batches:
        recs, codes = reconstruct(model, images)
        tally.add(images, captions, recs, codes)
    if not tally.values:
        raise DataError("the val split has no readable image to evaluate the dVAE on")
    originals, recs = np.concatenate(tally.originals), np.concatenate(tally.recons)
    usage = usage_of(tally.counts)
    metrics: dict[str, Any] = {"val_recon_mse": tally.sse / tally.values,
                               "val_perplexity": usage["perplexity"],
                               "val_perplexity_frac": usage["perplexity"] / model.vocab_size,
                               "val_codes_used": usage["codes_used"],
                               "n_val": int(tally.values // originals[0].size)}
    colour = np.concatenate(tally.colour)
    colour = colour[np.isfinite(colour)]
    if len(colour):
        metrics.update(val_colour_error=round(float(colour.mean()), 3),
                       val_colour_error_p90=round(float(np.percentile(colour, 90)), 3))
    if tally.recon_rows:  # per attribute too: which one the reconstructions lose
        scores = _means(tally.recon_rows)
        metrics["oracle_all_correct_recon"] = scores.pop("all_correct")
        metrics.update({f"oracle_recon_{k}": v for k, v in scores.items()})
        metrics["oracle_all_correct_originals"] = _means(tally.original_rows)["all_correct"]
    tracker.log_artifact(recon_grid(recon_png, originals, recs), "dvae")
    return metrics


def save_dvae(model: DiscreteVAE, out: Path, tracker: Any = None) -> Path:
    """`out` (weights `encoder.`/`decoder.` + config) and the config's readable JSON copy."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(out, state, dvae_config_dict(model))
    write_json(config_json(out), dvae_config_dict(model))
    if tracker is not None:
        tracker.register_model("dvae", [out, config_json(out)],
                               description="DALL-E discrete VAE (EMA weights)")
    return out
