"""The `train_prior` stage: the transformer prior on (caption, image-token) pairs (paper §2.2, §2.4).

Outputs: the prior (EMA weights + its `PriorConfig`), metrics and the loss curve. The loop
(dalle.train.loop) makes it resumable: one state file in a single process, per-rank slices when
sharded over Horovod ranks (dalle.distributed.checkpoint.RankStore).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dalle.catalog import SPLITS, Artefacts, config_json
from dalle.config_sections import Distributed, Prior, Tokenizer
from dalle.distributed.checkpoint import RankStore
from dalle.distributed.strategy import strategy_for
from dalle.errors import ConfigError, DataError
from dalle.io import save_checkpoint, write_json
from dalle.models.config import from_section
from dalle.models.transformer import DalleTransformer, PriorConfig, count_parameters, prior_config_dict
from dalle.stage import Out, StageSpec
from dalle.train.common import LocalStrategy, resolve_device, seed_everything
from dalle.precision import half_dtype
from dalle.train import half, precision_choice
from dalle.train.grad_scale import ResblockScaler
from dalle.train.half import HalfAdamW
from dalle.train.loop import Cadence, LocalStore, Loop, StepOut
from dalle.train.prior_data import BatchIterator, TokenSet, get_batch, load_tokens, make_caption_dropout
from dalle.train.prior_loop import (autocast_for, finite, lr_at, make_optimizer, model_flops_per_step,
                                    prior_loss)
from dalle.train.prior_samples import log_samples

log = logging.getLogger(__name__)


class PriorTrainer:
    """The prior's optimiser, per-resblock gradient scaler, batch iterator and step."""

    def __init__(self, cfg: Prior, model: DalleTransformer, strategy: Any, train: TokenSet,
                 dropout: Any, seed: int, precision: str = "fp32") -> None:
        self.cfg, self.model, self.strategy, self.train, self.dropout = cfg, model, strategy, train, dropout
        self.precision = precision  # resolved (dalle.precision): fp32 | bf16 | fp16
        self.device = next(model.parameters()).device
        self.half = store_16bit(cfg, model, strategy, precision)
        strategy.wrap(model)
        groups = strategy.param_groups(cfg.weight_decay)
        self.opt = (HalfAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
                    if self.half else make_optimizer(groups, cfg))
        self.scaler = (ResblockScaler(model.blocks, cfg.grad_scale_init, cfg.grad_scale_growth_interval)
                       if precision != "fp32" else None)
        self.batches = BatchIterator(len(train), cfg.batch_size, seed)
        self.skipped, self.history, self.done = 0, [], 0  # type: int, list[dict[str, float]], int
        self.tokens_per_step = cfg.batch_size * (model.seq_len - 1)

    def step(self, i: int) -> StepOut:
        """Forward/backward/clip/AdamW; a non-finite step is skipped and counted (App. D)."""
        cfg, model, strategy = self.cfg, self.model, self.strategy
        model.train()
        text, lengths, image = get_batch(self.train, next(self.batches)[strategy.batch_slice(cfg.batch_size)],
                                         self.dropout)
        strategy.before_forward()
        with autocast_for(self.precision, self.device):
            loss, stats = prior_loss(model, text.to(self.device), lengths.to(self.device), image.to(self.device),
                                     (cfg.loss_text_weight, cfg.loss_image_weight))
        loss.backward()  # the loss and the logits are fp32 (models.transformer), the blocks 16-bit
        strategy.after_backward()
        ok = self.scaler.unscale_() if self.scaler is not None else True
        factors = self.scaler.factors if self.scaler is not None else {}  # 16-bit grads: 1/scale
        norm = (half.clip_grad_norm_(model.parameters(), factors, cfg.grad_clip) if self.half
                else strategy.clip_grad_norm_(cfg.grad_clip))
        ok = (self.scaler.update() if self.scaler is not None else True) and ok and finite(norm)
        if ok:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(i, cfg)
            self.opt.step(factors=factors) if self.half else self.opt.step()
        else:
            self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        self.done = i + 1
        return StepOut(ok, {**stats, "grad_norm": norm, "lr": lr_at(i, cfg),
                            "skipped_steps": float(self.skipped)}, self.tokens_per_step)

    def log_row(self, out: StepOut, tokens_per_s: float) -> dict[str, float]:
        stats = out.stats
        self.history.append({"step": self.done, **{k: stats[k] for k in ("loss", "loss_text", "loss_image")}})
        return {**stats, "tokens_per_s": tokens_per_s, **(self.scaler.stats() if self.scaler else {})}

    def extra_state(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "scaler": self.scaler.state_dict() if self.scaler else {},
                "data": self.batches.position, "history": self.history}

    def load_extra(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped, self.history = int(state["skipped"]), list(state["history"])
        self.batches.epoch, self.batches.index = state["data"]["epoch"], state["data"]["index"]

    def plain_model(self, ema: bool) -> DalleTransformer:
        """The training model, or (sharded) an unsharded copy of its gathered weights (collective)."""
        if self.strategy.size == 1 and not ema and not self.half:
            return self.model
        weights = self.strategy.full_state_dict(self.model, ema=ema)
        fresh = self.strategy.size > 1 or self.half  # 16-bit storage: an fp32 copy is exported
        model = DalleTransformer(self.model.config).to(self.device) if fresh else self.model
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in weights.items()})
        return model


def store_16bit(cfg: Prior, model: DalleTransformer, strategy: Any, precision: str) -> bool:
    """`prior.store_16bit` (§2.4, dalle.train.half): the resblocks' matrices in 16-bit, in place.
    It needs a 16-bit precision (with fp32 arithmetic, e.g. `auto` choosing fp32 on a CPU without
    fast bf16, the parameters stay fp32, logged) and one process (sharding keeps fp32 slices)."""
    if not cfg.store_16bit:
        return False
    if precision == "fp32":
        log.warning("train_prior: prior.store_16bit ignored: the precision resolved to fp32")
        return False
    if strategy.size > 1 or not isinstance(strategy, LocalStrategy):
        raise ConfigError("prior.store_16bit is implemented for one process only: sharded ranks "
                          "keep fp32 slices (set it false, or distributed.num_proc 1)")
    n = len(half.to_16bit(model.blocks, half_dtype(precision)))
    log.info("train_prior: %d resblock matrices stored in %s (dalle.train.half)", n,
             half_dtype(precision))
    return True


@torch.no_grad()
def evaluate(model: DalleTransformer, data: TokenSet, cfg: Prior, max_rows: int = 512,
             precision: str = "fp32") -> dict[str, float]:
    """Mean per-kind loss on up to max_rows validation rows (stored tokens, no BPE dropout)."""
    model.eval()
    device, totals, n = next(model.parameters()).device, {"loss_text": 0.0, "loss_image": 0.0, "loss": 0.0}, 0
    rows = min(len(data), max_rows)
    for s in range(0, rows, cfg.batch_size):
        idx = torch.arange(s, min(rows, s + cfg.batch_size))
        text, lengths, image = get_batch(data, idx, None)
        with autocast_for(precision, device):
            _, stats = prior_loss(model, text.to(device), lengths.to(device), image.to(device),
                                  (cfg.loss_text_weight, cfg.loss_image_weight))
        for k in totals:
            totals[k] += stats[k] * len(idx)
        n += len(idx)
    return {f"val_{k}": v / n for k, v in totals.items()}


def _data(art: Artefacts, tok: Tokenizer, image_vocab: int) -> tuple[TokenSet, TokenSet]:
    train, val = (load_tokens(token_files(art, split), tok.text_len, split) for split in SPLITS)
    if int(train.image_tokens.max()) >= image_vocab or int(train.text_tokens.max()) >= tok.vocab_size:
        raise DataError(f"the train tokens in {art.tokens_dir} have ids beyond the vocabularies "
                        f"(image {image_vocab}, text {tok.vocab_size}); re-run encode")
    return train, val


def token_files(art: Artefacts, split: str) -> list[Path]:
    """The encode stage's files of a split, in shard order."""
    return sorted(art.tokens_dir.glob(art.tokens(split, 0).name.replace("00000", "*")))


def train_prior(art: Artefacts, tracker: Any, prior: Prior, tokenizer: Tokenizer, image_vocab: int,
                distributed: Distributed, seed: int) -> dict[str, float]:
    """Train the prior on the encoded tokens; returns the stage's metrics."""
    cfg, tok = prior, tokenizer
    sharded = strategy_for(distributed, seed)  # a ShardedStrategy on Horovod ranks, else None
    train, val = _data(art, tok, image_vocab)
    seed_everything(seed)
    config = from_section(PriorConfig, cfg, text_vocab=tok.vocab_size, text_len=tok.text_len,
                          image_vocab=image_vocab, grid=train.grid)
    model = DalleTransformer(config)
    # a sharded rank moves to its own GPU (cuda:<local rank>) before wrap slices it
    model.to(resolve_device(cfg.device) if sharded is None else sharded.device(cfg.device))
    strategy = sharded or LocalStrategy()
    n_params = count_parameters(model)[0]  # before a sharded strategy slices it
    dropout = make_caption_dropout(art.tokenizer, train, tok.text_len, tok.bpe_dropout)
    choice = _precision(cfg, model, train, strategy)
    trainer = PriorTrainer(cfg, model, strategy, train, dropout, seed, choice.precision)
    check = {**prior_config_dict(model), "steps": cfg.steps, "batch_size": cfg.batch_size}
    store = RankStore(art.prior_rank_states, prior_config_dict(model)) if strategy.size > 1 else \
        LocalStore(art.prior_state, check)
    tracker.log_params({"prior_params_total": n_params, "prior_precision_resolved": choice.precision,
                        "prior_precision_reason": choice.reason})

    def samples(step: int) -> None:
        """Sample grid + val loss (text, image; 256 rows) against the train curve, every
        sample_every steps."""
        plain = trainer.plain_model(ema=False)  # collective when sharded
        if strategy.is_chief:
            held = evaluate(plain, val, cfg, max_rows=256, precision=trainer.precision)
            tracker.log_metrics({k: v for k, v in held.items() if k != "val_loss"}, step=step)
            log_samples(plain, val, art, tracker, step)  # leaves the model in train mode

    loop = Loop("train_prior", model, trainer.opt, strategy,
                Cadence(cfg.steps, cfg.log_every, cfg.checkpoint_every, cfg.ema_decay), store, tracker,
                trainer.step, trainer.log_row,
                postfix=lambda r: {"loss": f"{r['loss']:.3f}", "img": f"{r['loss_image']:.3f}"},
                extra_state=trainer.extra_state, load_extra=trainer.load_extra,
                hooks=[(cfg.sample_every, samples)])
    _, rate = loop.run()
    return _finish(trainer, loop, art, tracker, val, rate)


def _precision(cfg: Prior, model: DalleTransformer, train: TokenSet, strategy: Any) -> Any:
    """`prior.precision` resolved on this rank's batch shape; ranks agree (bf16 only if all chose it)."""
    device = next(model.parameters()).device
    rows = torch.arange(min(len(train), cfg.batch_size // strategy.size))
    batch = tuple(t.to(device) for t in get_batch(train, rows, None))
    choice = precision_choice.for_prior(cfg.precision, model, batch,
                                        (cfg.loss_text_weight, cfg.loss_image_weight), device, prior_loss)
    if strategy.size > 1 and choice.precision == "bf16" and not strategy.agree_all(True):
        choice = replace(choice, precision="fp32", reason=choice.reason + "; another rank chose fp32")
    elif strategy.size > 1 and choice.precision != "bf16":
        strategy.agree_all(False)
    return choice


def _finish(trainer: PriorTrainer, loop: Loop, art: Artefacts, tracker: Any, val: TokenSet,
            rate: float) -> dict[str, float]:
    """EMA weights -> val loss, the exported prior and its metrics (rank 0); the resume state goes."""
    model = trainer.plain_model(ema=True)  # collective when sharded
    seq = trainer.model.seq_len - 1
    metrics = {**evaluate(model, val, trainer.cfg, precision=trainer.precision), "tokens_per_s": rate,
               "steps": float(loop.step), "precision": trainer.precision, "store_16bit": trainer.half,
               "model_gflop_per_s": rate * model_flops_per_step(trainer.model, 1) / seq / 1e9,
               "skipped_steps": float(trainer.skipped), "params_total": float(count_parameters(model)[0])}
    if trainer.history:
        metrics.update({f"train_{k}": trainer.history[-1][k] for k in ("loss", "loss_text", "loss_image")})
    if not trainer.strategy.is_chief:
        return metrics
    save_checkpoint(art.prior, model.state_dict(), prior_config_dict(model))
    write_json(config_json(art.prior), prior_config_dict(model))
    write_json(art.metrics("prior"), metrics)
    write_json(art.prior_loss, trainer.history)
    tracker.log_metrics(metrics, step=loop.step)
    tracker.register_model("dalle-prior", [art.prior, config_json(art.prior)],
                           description=f"prior, val image loss {metrics['val_loss_image']:.3f}")
    loop.store.remove()
    return metrics


STAGE = StageSpec(
    name="train_prior", fn=train_prior,
    params=("prior", "tokenizer", "dvae.vocab_size:image_vocab", "distributed", "seed"),
    inputs=lambda a: (a.tokenizer, a.tokens_dir),
    outputs=lambda a: (Out(a.prior), Out(config_json(a.prior)), Out(a.prior_loss, cache=False),
                       Out(a.curves("train_prior"), cache=False), Out(a.metrics("prior"), metric=True)),
    summary="the sparse-masked transformer: text ×1/8 + image ×7/8, per-resblock gradient scaling, "
            "Horovod sharding + PowerSGD when distributed.num_proc > 1 (§2.2–2.5)",
    distributed=True,
)
