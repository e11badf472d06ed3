"""Train the contrastive reranker (paper §2.6) on the clean train split; measure retrieval.

Symmetric InfoNCE with a learned temperature (CLIP), AdamW with linear warm-up and cosine decay.
Caption -> image retrieval top-1 is measured on the val split in groups of
`clip.retrieval_candidates` (32 on the default: pick the right image among 32). Resumable: a
training-state checkpoint is written every few log intervals and picked up by a rerun.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dalle.config_sections import Clip, Data, Paths, Tokenizer
from dalle.errors import DataError
from dalle.io import load_checkpoint, save_checkpoint, write_json
from dalle.models.clip import ContrastiveModel, contrastive_loss, model_config, uint8_to_float
from dalle.train.common import cosine_anneal, linear_warmup, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


def load_tokenizer(paths: Paths) -> Any:
    from dalle.data.tokenizer import BPETokenizer

    return BPETokenizer.load(Path(paths.models) / "tokenizer.json")


def tokenize(tokenizer: Any, captions: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = tokenizer.encode_padded(list(captions), text_len, dropout=False)
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)  # [N, T], pad -1
    lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long).clamp(min=1)  # [N]
    return ids, lengths


def load_pairs(paths: Paths, split: str, tokenizer: Any, text_len: int
               ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    from dalle.data.reader import load_split

    data = load_split(paths, split)
    if len(data.images) < 2:
        raise DataError(f"the {split} split has {len(data.images)} images; the contrastive model "
                        "needs at least 2 (check data/clean)")
    ids, lengths = tokenize(tokenizer, list(data.captions), text_len)
    return np.asarray(data.images), ids, lengths


@torch.no_grad()
def retrieval_top1(model: ContrastiveModel, images: np.ndarray, ids: torch.Tensor,
                   lengths: torch.Tensor, group: int) -> float:
    """Caption -> image top-1 accuracy within consecutive groups of `group` pairs."""
    model.eval()
    n = (len(images) // group) * group
    if n == 0:
        raise DataError(f"val split has {len(images)} images, fewer than "
                        f"clip.retrieval_candidates={group}")
    hits = 0
    for s in range(0, n, group):
        img = model.encode_image(uint8_to_float(images[s:s + group]))  # [G, D]
        txt = model.encode_text(ids[s:s + group], lengths[s:s + group])  # [G, D]
        hits += int((txt @ img.t()).argmax(dim=1).eq(torch.arange(group)).sum())
    model.train()
    return hits / n


def _lr(cfg: Clip, step: int) -> float:
    warm = max(1, cfg.steps // 20)
    return cfg.lr * linear_warmup(step, warm) * cosine_anneal(step, 1.0, 0.01, cfg.steps)


def _resume(path: Path, model: ContrastiveModel, opt: torch.optim.Optimizer, config: dict) -> int:
    if not path.is_file():
        return 0
    weights, _, state = load_checkpoint(path, expected_config=config, with_state=True)
    model.load_state_dict(weights)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log.info("train_clip: resuming from %s at step %d", path, state["step"])
    return int(state["step"])


def train_clip(cfg: Clip, data: Data, tok_cfg: Tokenizer, paths: Paths, tracker: Any,
               seed: int = 0) -> dict[str, Any]:
    """The `train_clip` stage: models/clip.safetensors + clip.json, metrics/clip.json."""
    seed_everything(seed)
    tokenizer = load_tokenizer(paths)
    images, ids, lengths = load_pairs(paths, "train", tokenizer, tok_cfg.text_len)
    config = model_config(cfg, data.image_size, tok_cfg.vocab_size, tok_cfg.text_len)
    model = ContrastiveModel(config, cfg.temperature_init)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    models_dir = Path(paths.models)
    state_path = models_dir / "clip.state.safetensors"
    start = _resume(state_path, model, opt, config)
    gen = torch.Generator().manual_seed(seed + start)
    t0, loss_sum = time.perf_counter(), 0.0
    bar = tqdm(range(start, cfg.steps), desc="train_clip", unit="step", initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        idx = torch.randint(len(images), (min(cfg.batch_size, len(images)),), generator=gen)
        img = model.encode_image(uint8_to_float(images[idx.numpy()]))  # [B, D]
        txt = model.encode_text(ids[idx], lengths[idx])  # [B, D]
        loss = contrastive_loss(img, txt, model.scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            tracker.log_metrics({"loss": loss_sum / n, "logit_scale": model.scale().item(),
                                 "lr": _lr(cfg, step)}, step=step + 1)
            bar.set_postfix(loss=f"{loss_sum / n:.3f}")
            loss_sum = 0.0
            if (step + 1) % (5 * cfg.log_every) == 0 and step + 1 < cfg.steps:
                save_checkpoint(state_path, model.state_dict(), config,
                                {"optimizer": opt.state_dict(), "rng": rng_state(), "step": step + 1})
    seconds = time.perf_counter() - t0
    return _finish(cfg, model, config, paths, tokenizer, tok_cfg, tracker, seconds, state_path)


def _finish(cfg: Clip, model: ContrastiveModel, config: dict, paths: Paths, tokenizer: Any,
            tok_cfg: Tokenizer, tracker: Any, seconds: float, state_path: Path) -> dict[str, Any]:
    val_images, val_ids, val_len = load_pairs(paths, "val", tokenizer, tok_cfg.text_len)
    top1 = retrieval_top1(model, val_images, val_ids, val_len, cfg.retrieval_candidates)
    models_dir = Path(paths.models)
    ckpt = save_checkpoint(models_dir / "clip.safetensors", model.state_dict(), config)
    write_json(models_dir / "clip.json", config)
    state_path.unlink(missing_ok=True)
    metrics = {"retrieval_top1": round(top1, 4), "retrieval_candidates": cfg.retrieval_candidates,
               "chance": round(1.0 / cfg.retrieval_candidates, 4),
               "logit_scale": round(model.scale().item(), 3), "train_seconds": round(seconds, 1),
               "params": sum(p.numel() for p in model.parameters())}
    write_json(Path(paths.metrics) / "clip.json", metrics)
    tracker.log_metrics({"retrieval_top1": top1}, step=cfg.steps)
    tracker.register_model("dalle-clip", [ckpt, models_dir / "clip.json"],
                           description=f"contrastive reranker, val top-1 {top1:.3f}")
    log.info("train_clip: val caption->image top-1 among %d = %.3f", cfg.retrieval_candidates, top1)
    return metrics
