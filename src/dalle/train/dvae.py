"""Training the discrete VAE (paper §2.1, App. A.2): the `train_dvae` stage.

Gumbel-softmax relaxation with tau cosine-annealed tau_start -> tau_final over tau_frac of the steps,
KL weight beta cosine-annealed 0 -> kl_max over kl_frac, AdamW with lr cosine-annealed lr -> lr_final
over lr_frac, and an EMA of the weights (exponentially weighted iterate averaging) which is what is
saved. The loop (dalle.train.loop) resumes a killed run with its schedules where they were; the
data order is a function of (seed, step). The train split is held in memory when it is small and
streamed from the clean shards when not (`dalle.data.stream`); `dvae.random_crop` adds random-crop
augmentation from the stored resolution.
"""
from __future__ import annotations

from typing import Any, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F

from dalle.catalog import Artefacts, config_json
from dalle.config_sections import DVAE, Loader
from dalle.data.reader import in_batches, split_index
from dalle.data.stream import InMemoryBatches, StreamingBatches, in_memory
from dalle.errors import DataError
from dalle.io import write_json
from dalle.models.config import from_section
from dalle.models.dvae import DiscreteVAE, DVAEConfig
from dalle.pixels import to_float
from dalle.stage import Out, StageSpec
from dalle.precision import autocast
from dalle.train import precision_choice
from dalle.train.common import LocalStrategy, cosine_anneal, resolve_device, seed_everything
from dalle.train.dvae_eval import evaluate_dvae, save_dvae
from dalle.train.dvae_loss import codebook_usage, elb_terms
from dalle.train.loop import Cadence, LocalStore, Loop, StepOut

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


Batches = Union[InMemoryBatches, StreamingBatches]


def train_batches(art: Artefacts, cfg: DVAE, loader: Loader, seed: int) -> tuple[Batches, int]:
    """The train split's batches (in memory when small, else streamed) and the images' side."""
    index = split_index(art, "train")
    side = index.side
    if side % (2 ** (cfg.group_count - 1)):
        raise DataError(f"train images are {side}x{side}; the dVAE needs a side that divides by "
                        f"{2 ** (cfg.group_count - 1)} (dvae.group_count)")
    if in_memory(index, loader):
        def pick(step: int, n: int) -> torch.Tensor:
            return batch_indices(n, cfg.batch_size, step, seed)
        return InMemoryBatches(art, "train", loader, pick), side
    return StreamingBatches(index, loader, cfg.batch_size, seed), side


def random_crop(images: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: a random square of `frac` x the side of each image, resized back to the
    side (bilinear, antialiased): float [B, 3, S, S] -> [B, 3, S, S]."""
    b, _, side, _ = images.shape
    crop = max(1, round(frac * side))
    corners = torch.randint(0, side - crop + 1, (b, 2), generator=gen)
    out = torch.stack([images[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(corners.tolist())])
    return F.interpolate(out, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


class DVAETrainer:
    """The dVAE's model, optimiser and step; the loop around it is dalle.train.loop."""

    def __init__(self, cfg: DVAE, batches: Batches, image_size: int, seed: int) -> None:
        self.cfg, self.batches, self.seed = cfg, batches, seed
        self.model = DiscreteVAE(from_section(DVAEConfig, cfg, image_size=image_size))
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.zero_init_logits:  # all codes start equal: no code wins by the input's DC term
            torch.nn.init.zeros_(self.model.encoder.blocks.output.conv.w)
        self.device = resolve_device(cfg.device)
        self.model.to(self.device, memory_format=self.fmt)
        self.strategy = LocalStrategy()
        self.strategy.wrap(self.model)
        self.opt = torch.optim.AdamW(self.strategy.param_groups(cfg.weight_decay), lr=cfg.lr,
                                     betas=(0.9, 0.999), eps=1e-8)  # paper App. A.2
        self.precision = precision_choice.for_dvae_model(cfg.precision, self.model, cfg.batch_size,
                                                         self.device, self.fmt, cfg.kl_max, elb_terms).precision

    def step(self, i: int) -> StepOut:
        cfg = self.cfg
        batch, _ = self.batches.batch(i)  # uint8 [B, H, W, 3]
        images = to_float(batch.to(self.device), self.fmt)  # [B, 3, H, W]
        if cfg.random_crop < 1.0:  # the stream of crops is a function of (seed, step)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            images = random_crop(images, cfg.random_crop, gen).contiguous(memory_format=self.fmt)
        sched = schedules(cfg, i)
        for group in self.opt.param_groups:
            group["lr"] = sched["lr"]
        with autocast(self.precision, self.device):  # `auto`: measured (dalle.precision)
            terms = elb_terms(self.model, images, sched["tau"], sched["beta"], cfg.straight_through,
                              cfg.usage_weight)
        self.opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        self.opt.step()
        return StepOut(True, {"terms": terms, **sched}, len(batch))

    def log_row(self, out: StepOut, images_per_s: float) -> dict[str, float]:
        t = out.stats["terms"]
        row = {"loss": float(t.loss.detach()), "nll_per_dim": float(t.nll), "kl_per_dim": float(t.kl),
               "elb_per_dim": -float(t.nll + t.kl), "recon_mse": float(t.mse),
               "tau": out.stats["tau"], "beta": out.stats["beta"], "lr": out.stats["lr"],
               "images_per_s": images_per_s}
        row.update({f"batch_{k}": v for k, v in codebook_usage(t.codes, self.cfg.vocab_size).items()})
        return row


def val_batches(art: Artefacts, loader: Loader, size: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The val split in manifest order, `size` images at a time (bounded memory: the training
    batch size, whose activations already fit)."""
    return in_batches(art, "val", size, loader.max_bad_fraction)


def train_dvae(art: Artefacts, tracker: Any, dvae: DVAE, loader: Loader, seed: int) -> dict[str, Any]:
    """Train on the clean train split; write the dVAE (EMA weights) + its config + metrics."""
    cfg = dvae
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(seed)
    batches, image_size = train_batches(art, cfg, loader, seed)
    trainer = DVAETrainer(cfg, batches, image_size, seed)
    tracker.log_params({"dvae_params": sum(p.numel() for p in trainer.model.parameters())})
    loop = Loop("train_dvae", trainer.model, trainer.opt, trainer.strategy,
                Cadence(cfg.steps, cfg.log_every, cfg.checkpoint_every, cfg.ema_decay),
                LocalStore(art.dvae_state, _resume_config(cfg, image_size, seed)), tracker,
                trainer.step, trainer.log_row,
                postfix=lambda r: {"mse": f"{r['recon_mse']:.4f}", "ppl": f"{r['batch_perplexity']:.0f}"})
    seconds, _ = loop.run()
    model = trainer.model  # the EMA weights are what is saved and used
    model.load_state_dict(trainer.strategy.full_state_dict(model, ema=True))
    model = model.cpu().eval()
    metrics = evaluate_dvae(model, val_batches(art, loader, cfg.batch_size), art.dvae_recon, tracker)
    metrics.update({"train_seconds": round(seconds, 2), "steps": cfg.steps, "image_size": image_size})
    metrics["precision"] = trainer.precision
    save_dvae(model, art.dvae, tracker)
    write_json(art.metrics("dvae"), metrics)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()
                         if isinstance(v, (int, float))}, step=cfg.steps)
    loop.store.remove()
    return metrics


STAGE = StageSpec(
    name="train_dvae", fn=train_dvae, params=("dvae", "loader", "seed"),
    inputs=lambda a: (a.clean,),
    outputs=lambda a: (Out(a.dvae), Out(config_json(a.dvae)), Out(a.dvae_recon),
                       Out(a.curves("train_dvae"), cache=False), Out(a.metrics("dvae"), metric=True)),
    summary="the dVAE with gumbel-softmax, logit-Laplace, β and τ annealing, EMA (§2.1, App. A)",
)
