"""Held-out evaluation and saving of a trained dVAE: recon MSE, codebook usage, oracle accuracy."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dalle.catalog import config_json
from dalle.eval import oracle
from dalle.io import save_checkpoint, write_json
from dalle.models.dvae import DiscreteVAE, dvae_config_dict
from dalle.pixels import as_rgb_uint8, grid, save_png, to_float, to_uint8
from dalle.train.dvae_loss import codebook_usage

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


def oracle_scores(captions: list[str], images: np.ndarray) -> Optional[dict[str, float]]:
    """The synthetic-world oracle over up to ORACLE_LIMIT images: the fraction read as matching
    their caption exactly ("all_correct") and the fraction right in each attribute."""
    if not captions:
        return None
    n = min(len(captions), len(images), ORACLE_LIMIT)
    rows = [oracle.score(captions[i], images[i]) for i in range(n)]
    return {k: float(np.mean([bool(r[k]) for r in rows])) for k in ("all_correct", *oracle.ATTRIBUTES)}


def oracle_accuracy(captions: list[str], images: np.ndarray) -> Optional[float]:
    """Fraction of images the synthetic-world oracle reads as matching their caption exactly."""
    scores = oracle_scores(captions, images)
    return None if scores is None else scores["all_correct"]


def recon_grid(path: Path, originals: np.ndarray, recons: np.ndarray, n: int = 8) -> Path:
    """PNG: the first n originals (top row) above their reconstructions (bottom row)."""
    n = min(n, len(originals))
    return save_png(grid(np.concatenate([originals[:n], recons[:n]]), cols=n), path)


def evaluate_dvae(model: DiscreteVAE, val_images: np.ndarray, val_captions: list[str],
                  recon_png: Path, tracker: Any) -> dict[str, Any]:
    """Val reconstruction MSE, codebook usage, the oracle's per-attribute reading of the
    reconstructions (synthetic world), and the originals-over-reconstructions PNG."""
    val = as_rgb_uint8(val_images, model.config.image_size, "val")
    recs, codes = reconstruct(model, val)
    mse = float(((recs.astype(np.float32) - val.astype(np.float32)) / 255).__pow__(2).mean())
    usage = codebook_usage(codes, model.vocab_size)
    metrics: dict[str, Any] = {"val_recon_mse": mse, "val_perplexity": usage["perplexity"],
                               "val_perplexity_frac": usage["perplexity"] / model.vocab_size,
                               "val_codes_used": usage["codes_used"], "n_val": len(val)}
    scores = oracle_scores(val_captions, recs)
    if scores is not None:  # per attribute too: which one the reconstructions lose
        metrics["oracle_all_correct_recon"] = scores.pop("all_correct")
        metrics.update({f"oracle_recon_{k}": v for k, v in scores.items()})
        metrics["oracle_all_correct_originals"] = oracle_accuracy(val_captions, val)
    tracker.log_artifact(recon_grid(recon_png, val, recs), "dvae")
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
