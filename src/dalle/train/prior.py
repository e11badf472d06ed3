"""The `train_prior` stage: the transformer prior on (caption, image-token) pairs (paper §2.2, §2.4).

Outputs: models/prior.safetensors (EMA weights) + models/prior.json, metrics/prior.json,
plots/prior_loss.json; resumable from models/prior.ckpt.safetensors (model, EMA, optimiser,
per-resblock grad scales, data position, RNG, loss history).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from dalle.io import load_checkpoint, remove_checkpoint, save_checkpoint, write_json
from dalle.models.transformer import DalleTransformer, build_prior, count_parameters, from_config, model_config
from dalle.train.common import resolve_device, rng_state, seed_everything, set_rng_state
from dalle.train.grad_scale import ResblockScaler
from dalle.train.prior_data import BatchIterator, TokenSet, get_batch, load_tokens, make_caption_dropout
from dalle.train.prior_loop import (LocalStrategy, autocast_for, finite, lr_at, make_optimizer,
                                    model_flops_per_step, prior_loss)
from dalle.train.prior_samples import log_samples

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Any, model: DalleTransformer, strategy: Any, train: TokenSet, dropout: Any,
                 seed: int) -> None:
        self.cfg, self.model, self.strategy, self.train, self.dropout = cfg, model, strategy, train, dropout
        strategy.wrap(model)
        self.opt = make_optimizer(strategy.param_groups(cfg.weight_decay), cfg)
        self.scaler = (ResblockScaler(model.blocks, cfg.grad_scale_init, cfg.grad_scale_growth_interval)
                       if cfg.precision != "fp32" else None)
        self.batches = BatchIterator(len(train), cfg.batch_size, seed)
        self.step, self.skipped, self.history = 0, 0, []  # type: int, int, list[dict[str, float]]
        self.device = next(model.parameters()).device

    def one_step(self) -> dict[str, float]:
        """Forward/backward/clip/AdamW/EMA; a non-finite step is skipped and counted (App. D)."""
        cfg, model, strategy = self.cfg, self.model, self.strategy
        model.train()
        text, lengths, image = get_batch(self.train, next(self.batches)[strategy.batch_slice(cfg.batch_size)],
                                         self.dropout)
        strategy.before_forward()
        with autocast_for(cfg.precision, self.device):
            loss, stats = prior_loss(model, text.to(self.device), lengths.to(self.device), image.to(self.device),
                                     (cfg.loss_text_weight, cfg.loss_image_weight))
        loss.backward()
        strategy.after_backward()
        ok = self.scaler.unscale_() if self.scaler is not None else True
        norm = strategy.clip_grad_norm_(cfg.grad_clip)
        ok = (self.scaler.update() if self.scaler is not None else True) and ok and finite(norm)
        if ok:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, cfg)
            self.opt.step()
            strategy.ema_update(cfg.ema_decay)
        else:
            self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {**stats, "grad_norm": norm, "lr": lr_at(self.step - 1, cfg), "skipped_steps": float(self.skipped)}

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "optimizer": self.opt.state_dict(),
                "strategy": self.strategy.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
                "data": self.batches.position, "rng": rng_state(), "history": self.history}

    def load_extra(self, state: dict[str, Any]) -> None:
        """Everything but weights/optimiser/strategy (those come from the per-rank checkpoint)."""
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped, self.history = int(state["step"]), int(state["skipped"]), list(state["history"])
        self.batches.epoch, self.batches.index = state["data"]["epoch"], state["data"]["index"]
        set_rng_state(state["rng"])

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped, self.history = int(state["step"]), int(state["skipped"]), list(state["history"])
        self.batches.epoch, self.batches.index = state["data"]["epoch"], state["data"]["index"]
        set_rng_state(state["rng"])


@torch.no_grad()
def evaluate(model: DalleTransformer, data: TokenSet, cfg: Any, max_rows: int = 512) -> dict[str, float]:
    """Mean per-kind loss on up to max_rows validation rows (stored tokens, no BPE dropout)."""
    model.eval()
    device, totals, n = next(model.parameters()).device, {"loss_text": 0.0, "loss_image": 0.0, "loss": 0.0}, 0
    rows = min(len(data), max_rows)
    for s in range(0, rows, cfg.batch_size):
        idx = torch.arange(s, min(rows, s + cfg.batch_size))
        text, lengths, image = get_batch(data, idx, None)
        with autocast_for(cfg.precision, device):
            _, stats = prior_loss(model, text.to(device), lengths.to(device), image.to(device),
                                  (cfg.loss_text_weight, cfg.loss_image_weight))
        for k in totals:
            totals[k] += stats[k] * len(idx)
        n += len(idx)
    return {f"val_{k}": v / n for k, v in totals.items()}


def train_prior(prior_cfg: Any, tokenizer_cfg: Any, paths: Any, tracker: Any, distributed: Any = None,
                image_vocab: Optional[int] = None, seed: int = 0) -> dict[str, float]:
    """Train the prior on paths.tokens/{train,val}.npz; returns the stage's metrics."""
    tokens, models = Path(paths.tokens), Path(paths.models)
    train, val = load_tokens(tokens / "train.npz", tokenizer_cfg.text_len), load_tokens(tokens / "val.npz", tokenizer_cfg.text_len)
    vocab = image_vocab or int(train.image_tokens.max()) + 1
    if int(train.image_tokens.max()) >= vocab or int(train.text_tokens.max()) >= tokenizer_cfg.vocab_size:
        from dalle.errors import DataError
        raise DataError(f"{tokens}/train.npz has token ids beyond the vocabularies "
                        f"(image {vocab}, text {tokenizer_cfg.vocab_size}); re-run encode")
    seed_everything(seed)
    mcfg = model_config(prior_cfg, tokenizer_cfg.vocab_size, tokenizer_cfg.text_len, vocab, train.grid)
    model = build_prior(prior_cfg, tokenizer_cfg.vocab_size, tokenizer_cfg.text_len, vocab, train.grid)
    # issue 6: a sharded rank moves to its own GPU (cuda:<local rank>) before wrap slices it
    model.to(resolve_device(prior_cfg.device) if distributed is None else distributed.device(prior_cfg.device))
    strategy = distributed or LocalStrategy()
    n_params = count_parameters(model)[0]  # before a sharded strategy slices it
    dropout = make_caption_dropout(models, train, tokenizer_cfg.text_len, tokenizer_cfg.bpe_dropout)
    trainer = Trainer(prior_cfg, model, strategy, train, dropout, seed)
    ckpt = models / "prior.ckpt.safetensors"
    if strategy.size > 1:  # sharded (issue 6): per-rank slices, Adam state, error buffers
        from dalle.distributed.checkpoint import resume_rank

        step, extra = resume_rank(models / "prior.ckpt", strategy, trainer.opt, mcfg)
        if step:
            trainer.load_extra(extra)
    elif ckpt.is_file():
        weights, _, state = load_checkpoint(ckpt, expected_config={**mcfg, "steps": prior_cfg.steps,
                                                                   "batch_size": prior_cfg.batch_size}, with_state=True)
        trainer.load(weights, state)
        log.info("resumed from %s at step %d", ckpt, trainer.step)
    tracker.log_params({"prior_params_total": n_params})
    rate = _loop(trainer, tracker, ckpt, mcfg, val, models)
    return _finish(trainer, tracker, mcfg, val, paths, rate)


def _loop(trainer: Trainer, tracker: Any, ckpt: Path, mcfg: dict[str, Any], val: TokenSet, models: Path) -> float:
    cfg, t0, done0 = trainer.cfg, time.perf_counter(), trainer.step
    tokens_per_step = cfg.batch_size * (trainer.model.seq_len - 1)
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train_prior", unit="step")
    while trainer.step < cfg.steps:
        stats = trainer.one_step()
        bar.update(1)
        rate = tokens_per_step * (trainer.step - done0) / (time.perf_counter() - t0)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            metrics = {**stats, "tokens_per_s": rate, **(trainer.scaler.stats() if trainer.scaler else {})}
            tracker.log_metrics(metrics, step=trainer.step)
            trainer.history.append({"step": trainer.step, **{k: stats[k] for k in ("loss", "loss_text", "loss_image")}})
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img=f"{stats['loss_image']:.3f}")
        if trainer.step % cfg.sample_every == 0:
            model = _plain_model(trainer, mcfg, ema=False)  # collective when sharded
            if trainer.strategy.is_chief:
                log_samples(model, val, models, tracker, trainer.step)
        if trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps:
            _save(trainer, ckpt, {**mcfg, "steps": cfg.steps, "batch_size": cfg.batch_size}, ema=False, state=True)
    bar.close()
    return tokens_per_step * max(1, trainer.step - done0) / max(1e-9, time.perf_counter() - t0)


def _save(trainer: Trainer, path: Path, config: dict[str, Any], ema: bool, state: bool) -> None:
    if state and trainer.strategy.size > 1:  # every rank writes its own slices (issue 6)
        from dalle.distributed.checkpoint import save_rank

        extra = {k: v for k, v in trainer.state().items() if k not in ("optimizer", "strategy")}
        save_rank(path.parent / "prior.ckpt", trainer.strategy, trainer.opt, trainer.step, extra,
                  {k: v for k, v in config.items() if k not in ("steps", "batch_size")})
        return
    weights = trainer.strategy.full_state_dict(trainer.model, ema=ema)
    if trainer.strategy.is_chief:
        save_checkpoint(path, weights, config, trainer.state() if state else None)


def _plain_model(trainer: Trainer, mcfg: dict[str, Any], ema: bool) -> DalleTransformer:
    """The training model, or (sharded, issue 6) an unsharded copy of its gathered weights."""
    if trainer.strategy.size == 1:
        return trainer.model
    model = from_config(mcfg)
    model.load_state_dict(trainer.strategy.full_state_dict(trainer.model, ema=ema))
    return model


def _finish(trainer: Trainer, tracker: Any, mcfg: dict[str, Any], val: TokenSet, paths: Any, rate: float) -> dict[str, float]:
    models = Path(paths.models)
    weights = trainer.strategy.full_state_dict(trainer.model, ema=True)
    model = trainer.model if trainer.strategy.size == 1 else from_config(mcfg)  # sharded: a plain copy
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in weights.items()})
    metrics = {**evaluate(model, val, trainer.cfg), "tokens_per_s": rate, "steps": float(trainer.step),
               "model_gflop_per_s": rate * model_flops_per_step(trainer.model, 1) / (trainer.model.seq_len - 1) / 1e9,
               "skipped_steps": float(trainer.skipped), "params_total": float(count_parameters(model)[0])}
    if trainer.history:
        metrics.update({f"train_{k}": trainer.history[-1][k] for k in ("loss", "loss_text", "loss_image")})
    if not trainer.strategy.is_chief:
        return metrics
    save_checkpoint(models / "prior.safetensors", weights, mcfg)
    write_json(models / "prior.json", mcfg)
    write_json(Path(paths.metrics) / "prior.json", metrics)
    write_json(Path(paths.plots) / "prior_loss.json", trainer.history)
    tracker.log_metrics(metrics, step=trainer.step)
    tracker.register_model("dalle-prior", [models / "prior.safetensors", models / "prior.json"],
                           description=f"prior, val image loss {metrics['val_loss_image']:.3f}")
    remove_checkpoint(models / "prior.ckpt.safetensors")  # and its .prev
    shutil.rmtree(models / "prior.ckpt", ignore_errors=True)  # per-rank checkpoints (sharded runs)
    return metrics
