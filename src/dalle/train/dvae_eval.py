"""Held-out evaluation and saving of a trained dVAE: recon MSE, codebook usage, oracle accuracy."""
from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from dalle.config_sections import Paths
from dalle.io import atomic_path, save_checkpoint, write_json
from dalle.models.dvae import DiscreteVAE, as_rgb_uint8, to_float
from dalle.train.dvae_loss import codebook_usage

log = logging.getLogger("dalle.dvae")
ORACLE_LIMIT = 1000  # val images scored by the oracle (its cost is per image)


@torch.no_grad()
def reconstruct(model: DiscreteVAE, images: np.ndarray,
                batch_size: int = 256) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 [N, H, W, 3] -> (reconstructions uint8 [N, H, W, 3], argmax codes long [N, h*w])."""
    recs, codes = [], []
    for i in range(0, len(images), batch_size):
        x = to_float(torch.from_numpy(images[i:i + batch_size]))  # [B, 3, H, W]
        z = model.encode(x)  # [B, h*w], argmax (paper §2.2)
        recs.append((model.decode(z) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
        codes.append(z)
    return torch.cat(recs).numpy(), torch.cat(codes)


def _oracle() -> Optional[ModuleType]:
    try:
        from dalle.eval import oracle
    except ImportError:
        log.warning("dalle.eval.oracle is not available; skipping oracle accuracy")
        return None
    return oracle


def oracle_scores(captions: list[str], images: np.ndarray) -> Optional[dict[str, float]]:
    """The synthetic-world oracle over up to ORACLE_LIMIT images: the fraction read as matching
    their caption exactly ("all_correct") and the fraction right in each attribute."""
    oracle = _oracle()
    if oracle is None or not captions:
        return None
    n = min(len(captions), len(images), ORACLE_LIMIT)
    rows = [oracle.score(captions[i], images[i]) for i in range(n)]
    return {k: float(np.mean([bool(r[k]) for r in rows])) for k in ("all_correct", *oracle.ATTRIBUTES)}


def oracle_accuracy(captions: list[str], images: np.ndarray) -> Optional[float]:
    """Fraction of images the synthetic-world oracle reads as matching their caption exactly."""
    scores = oracle_scores(captions, images)
    return None if scores is None else scores["all_correct"]


def write_grid(path: Path, originals: np.ndarray, recons: np.ndarray, n: int = 8) -> Path:
    """PNG: top row originals, bottom row reconstructions."""
    n = min(n, len(originals))
    top = np.concatenate(list(originals[:n]), axis=1)  # [H, n*W, 3]
    bottom = np.concatenate(list(recons[:n]), axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate([top, bottom], axis=0)).save(tmp, format="PNG")
    return path


def evaluate_dvae(model: DiscreteVAE, val_images: np.ndarray, val_captions: list[str],
                  paths: Paths, tracker: Any) -> dict[str, Any]:
    val = as_rgb_uint8(val_images, model.config["image_size"], "val")
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
    grid = write_grid(Path(paths.models) / "dvae_recon.png", val, recs)
    tracker.log_artifact(grid, "dvae")
    return metrics


def save_dvae(model: DiscreteVAE, out: Path, tracker: Any = None) -> Path:
    """`out` (models/dvae.safetensors: weights `encoder.`/`decoder.` + config) and its .json."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(out, state, model.config)
    write_json(out.with_suffix(".json"), model.config)
    if tracker is not None:
        tracker.register_model("dvae", [out, out.with_suffix(".json")],
                               description="DALL-E discrete VAE (EMA weights)")
    return out
