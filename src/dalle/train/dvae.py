"""Training the discrete VAE (paper §2.1, App. A.2): the `train_dvae` stage's library function.

Gumbel-softmax relaxation with tau cosine-annealed tau_start -> tau_final over tau_frac of the steps,
KL weight beta cosine-annealed 0 -> kl_max over kl_frac, AdamW with lr cosine-annealed lr -> lr_final
over lr_frac, and an EMA of the weights (exponentially weighted iterate averaging) which is what is
saved. A training-state checkpoint (model, EMA, optimiser, step, RNG) lets a killed run continue
with its schedules where they were; the data order is a function of (seed, step).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from dalle.config_sections import DVAE, Paths
from dalle.errors import CheckpointError, DataError
from dalle.io import load_checkpoint, remove_checkpoint, save_checkpoint, write_json
from dalle.models.dvae import DiscreteVAE, as_rgb_uint8, model_config, to_float
from dalle.train.common import EMA, cosine_anneal, resolve_device, rng_state, seed_everything, set_rng_state
from dalle.train.dvae_eval import evaluate_dvae, save_dvae
from dalle.train.dvae_loss import codebook_usage, elb_terms


log = logging.getLogger("dalle.dvae")
STATE_FILE = "dvae_train_state.safetensors"
_NOT_IN_RESUME_CHECK = ("log_every", "checkpoint_every", "threads", "channels_last", "device")


def schedules(cfg: DVAE, step: int) -> dict[str, float]:
    """tau, beta and lr at `step` (App. A.2; lengths are fractions of the step budget)."""
    return {
        "tau": cosine_anneal(step, cfg.tau_start, cfg.tau_final, round(cfg.tau_frac * cfg.steps)),
        "beta": cosine_anneal(step, 0.0, cfg.kl_max, round(cfg.kl_frac * cfg.steps)),
        "lr": cosine_anneal(step, cfg.lr, cfg.lr_final, round(cfg.lr_frac * cfg.steps)),
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The data position is the step: epoch e uses permutation(seed + e), batches in order."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size:(pos + 1) * batch_size]


def _resume_config(cfg: DVAE, image_size: int, seed: int) -> dict[str, Any]:
    out = {k: v for k, v in cfg.model_dump().items() if k not in _NOT_IN_RESUME_CHECK}
    return {**out, "image_size": image_size, "seed": seed}


def _load_images(paths: Paths, split: str) -> tuple[np.ndarray, list[str]]:
    from dalle.data.reader import load_split

    data = load_split(paths, split)
    if len(data.keys) == 0:
        raise DataError(f"the {split} split under {paths.clean} is empty; run collect/dedup first")
    return np.asarray(data.images), list(data.captions)


class _Trainer:
    def __init__(self, cfg: DVAE, image_size: int, seed: int, state_path: Path) -> None:
        self.cfg, self.state_path = cfg, state_path
        self.model = DiscreteVAE(model_config(cfg, image_size))
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.zero_init_logits:  # all codes start equal: no code wins by the input's DC term
            torch.nn.init.zeros_(self.model.encoder.blocks.output.conv.w)
        self.device = resolve_device(cfg.device)
        self.model.to(self.device, memory_format=self.fmt)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                     eps=1e-8, weight_decay=cfg.weight_decay)  # paper App. A.2
        self.ema = EMA(self.model, cfg.ema_decay)
        self.step = 0
        self.check = _resume_config(cfg, image_size, seed)

    def save_state(self) -> None:
        state = {"optimizer": self.opt.state_dict(), "ema": self.ema.state_dict(),
                 "step": self.step, "rng": rng_state()}
        save_checkpoint(self.state_path, self.model.state_dict(), self.check, state=state)

    def try_resume(self) -> bool:
        if not self.state_path.exists():
            return False
        try:
            weights, _, state = load_checkpoint(self.state_path, self.check, with_state=True)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc.one_line()} (delete it to start over)") from None
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return True

    def train_step(self, images: torch.Tensor) -> dict[str, Any]:
        sched = schedules(self.cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = sched["lr"]
        terms = elb_terms(self.model, images, sched["tau"], sched["beta"], self.cfg.straight_through,
                          self.cfg.usage_weight)
        self.opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        return {"terms": terms, **sched}


def _log_row(out: dict[str, Any], vocab: int, step: int, images_per_s: float) -> dict[str, float]:
    t = out["terms"]
    row = {"loss": float(t.loss.detach()), "nll_per_dim": float(t.nll), "kl_per_dim": float(t.kl),
           "elb_per_dim": -float(t.nll + t.kl), "recon_mse": float(t.mse), "tau": out["tau"],
           "beta": out["beta"], "lr": out["lr"], "images_per_s": images_per_s}
    row.update({f"batch_{k}": v for k, v in codebook_usage(t.codes, vocab).items()})
    return row


def train_dvae(cfg: DVAE, paths: Paths, tracker: Any, seed: int = 0,
               train_images: Optional[np.ndarray] = None,
               val: Optional[tuple[np.ndarray, list[str]]] = None) -> dict[str, Any]:
    """Train on the clean train split; write models/dvae.safetensors (EMA) + dvae.json + metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(seed)
    train_np = train_images if train_images is not None else _load_images(paths, "train")[0]
    train = torch.from_numpy(as_rgb_uint8(train_np, None, "train"))  # [N, H, W, 3] uint8
    image_size = int(train.shape[1])
    if train.shape[1] != train.shape[2] or image_size % (2 ** (cfg.group_count - 1)):
        raise DataError(f"train images are {tuple(train.shape[1:3])}; the dVAE needs square images "
                        f"whose side divides by {2 ** (cfg.group_count - 1)} (dvae.group_count)")
    trainer = _Trainer(cfg, image_size, seed, Path(paths.models) / STATE_FILE)
    if trainer.try_resume():
        log.info("resuming dVAE training at step %d of %d", trainer.step, cfg.steps)
    tracker.log_params({"dvae_params": sum(p.numel() for p in trainer.model.parameters())})
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train_dvae", unit="step")
    t0, n0 = time.perf_counter(), trainer.step
    while trainer.step < cfg.steps:
        idx = batch_indices(len(train), cfg.batch_size, trainer.step, seed)
        out = trainer.train_step(to_float(train[idx].to(trainer.device), trainer.fmt))
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            rate = (trainer.step - n0) * cfg.batch_size / (time.perf_counter() - t0)
            row = _log_row(out, cfg.vocab_size, trainer.step, rate)
            tracker.log_metrics(row, step=trainer.step)
            bar.set_postfix(mse=f"{row['recon_mse']:.4f}", ppl=f"{row['batch_perplexity']:.0f}")
        if trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps:
            trainer.save_state()
    bar.close()
    train_s = time.perf_counter() - t0
    trainer.ema.copy_to(trainer.model)  # the EMA weights are what is saved and used
    model = trainer.model.cpu().eval()
    val_np, val_captions = val if val is not None else _load_images(paths, "val")
    metrics = evaluate_dvae(model, val_np, val_captions, paths, tracker)
    metrics.update({"train_seconds": round(train_s, 2), "steps": cfg.steps, "image_size": image_size})
    save_dvae(model, Path(paths.models) / "dvae.safetensors", tracker)
    write_json(Path(paths.metrics) / "dvae.json", metrics)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()
                         if isinstance(v, (int, float))}, step=cfg.steps)
    remove_checkpoint(trainer.state_path)  # done (and its .prev): a rerun with new params starts afresh
    return metrics
