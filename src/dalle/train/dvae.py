"""Training the discrete VAE (paper §2.1, App. A.2): the `train_dvae` stage.

Gumbel-softmax relaxation with tau cosine-annealed tau_start -> tau_final over tau_frac of the steps,
KL weight beta cosine-annealed 0 -> kl_max over kl_frac, AdamW with lr cosine-annealed lr -> lr_final
over lr_frac, and an EMA of the weights (exponentially weighted iterate averaging) which is what is
saved. The loop (dalle.train.loop) resumes a killed run with its schedules where they were; the
data order is a function of (seed, step). The train split is held in memory when it is small and
streamed from the clean shards when not (`dalle.data.stream`); `dvae.random_crop` adds random-crop
augmentation from the stored resolution.

Under horovodrun (`distributed.num_proc > 1`) it trains data-parallel
(dalle.distributed.data_parallel): in memory, rank r takes rows [r*B/n, (r+1)*B/n) of the batch
one process would draw, the gumbel noise and the crops are drawn for the whole batch and sliced,
the codebook-usage term reads every rank's mean posterior: the weights equal one process's to float
rounding. Streamed, each rank reads B/n samples of its own share of the epoch (no sample twice).
Rank 0 alone checkpoints, evaluates, writes and logs.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from dalle.catalog import Artefacts, config_json
from dalle.config_sections import DVAE, Loader
from dalle.distributed.data_parallel import ChiefStore, agreed_precision, data_parallel, divides
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
from dalle.train.dvae_loss import BatchPart, codebook_usage, elb_terms, usage_of
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


def train_batches(art: Artefacts, cfg: DVAE, loader: Loader, seed: int,
                  strategy: Any = None) -> tuple[Batches, int]:
    """The train split's batches (in memory when small, else streamed) and the images' side;
    under data parallelism this rank's part of them (module docstring)."""
    strategy = strategy or LocalStrategy()
    rows = strategy.batch_slice(cfg.batch_size)
    index = split_index(art, "train")
    side = index.side
    if side % (2 ** (cfg.group_count - 1)):
        raise DataError(f"train images are {side}x{side}; the dVAE needs a side that divides by "
                        f"{2 ** (cfg.group_count - 1)} (dvae.group_count)")
    if in_memory(index, loader):
        def pick(step: int, n: int) -> torch.Tensor:
            return batch_indices(n, cfg.batch_size, step, seed)[rows]
        return InMemoryBatches(art, "train", loader, pick), side
    return StreamingBatches(index, loader, rows.stop - rows.start, seed, strategy.rank,
                            strategy.size), side


def random_crop(images: torch.Tensor, frac: float, gen: torch.Generator,
                part: Optional[BatchPart] = None) -> torch.Tensor:
    """Augmentation: a random square of `frac` x the side of each image, resized back to the
    side (bilinear, antialiased): float [B, 3, S, S] -> [B, 3, S, S]. `part`: the corners are
    drawn for the whole data-parallel batch and this rank's rows kept."""
    b, _, side, _ = images.shape
    crop = max(1, round(frac * side))
    corners = torch.randint(0, side - crop + 1, (part.total if part else b, 2), generator=gen)
    corners = corners[part.rows] if part else corners
    out = torch.stack([images[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(corners.tolist())])
    return F.interpolate(out, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


class DVAETrainer:
    """The dVAE's model, optimiser and step; the loop around it is dalle.train.loop."""

    def __init__(self, cfg: DVAE, batches: Batches, image_size: int, seed: int,
                 strategy: Any = None) -> None:
        self.cfg, self.batches, self.seed = cfg, batches, seed
        self.strategy = cast(Any, strategy or LocalStrategy())  # or data_parallel.DataParallel
        self.model = DiscreteVAE(from_section(DVAEConfig, cfg, image_size=image_size))
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.zero_init_logits:  # all codes start equal: no code wins by the input's DC term
            torch.nn.init.zeros_(self.model.encoder.blocks.output.conv.w)
        self.device = (resolve_device(cfg.device) if self.strategy.size == 1
                       else self.strategy.device(cfg.device, "dvae.device"))
        self.model.to(self.device, memory_format=self.fmt)
        self.strategy.wrap(self.model)
        rows = self.strategy.batch_slice(cfg.batch_size)
        self.part = (BatchPart(rows, cfg.batch_size, self.strategy.gather_rows)
                     if self.strategy.size > 1 else None)
        self.opt = torch.optim.AdamW(self.strategy.param_groups(cfg.weight_decay), lr=cfg.lr,
                                     betas=(0.9, 0.999), eps=1e-8)  # paper App. A.2
        chosen = precision_choice.for_dvae_model(cfg.precision, self.model, rows.stop - rows.start,
                                                 self.device, self.fmt, cfg.kl_max, elb_terms).precision
        self.precision = agreed_precision(self.strategy, chosen)

    def step(self, i: int) -> StepOut:
        cfg = self.cfg
        batch, _ = self.batches.batch(i)  # uint8 [B, H, W, 3]
        images = to_float(batch.to(self.device), self.fmt)  # [B, 3, H, W]
        if cfg.random_crop < 1.0:  # the stream of crops is a function of (seed, step)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            images = random_crop(images, cfg.random_crop, gen, self.part).contiguous(memory_format=self.fmt)
        sched = schedules(cfg, i)
        for group in self.opt.param_groups:
            group["lr"] = sched["lr"]
        with autocast(self.precision, self.device):  # `auto`: measured (dalle.precision)
            terms = elb_terms(self.model, images, sched["tau"], sched["beta"], cfg.straight_through,
                              cfg.usage_weight, self.part)
        self.opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        self.strategy.after_backward()  # data parallel: the ranks' mean gradient; else nothing
        self.opt.step()
        return StepOut(True, {"terms": terms, **sched}, len(batch))

    def log_row(self, out: StepOut, images_per_s: float) -> dict[str, float]:
        t = out.stats["terms"]
        if self.strategy.size > 1:  # the global batch's values (collective: every rank logs)
            return self._global_row(out, images_per_s * self.strategy.size)
        row = {"loss": float(t.loss.detach()), "nll_per_dim": float(t.nll), "kl_per_dim": float(t.kl),
               "elb_per_dim": -float(t.nll + t.kl), "recon_mse": float(t.mse),
               "tau": out.stats["tau"], "beta": out.stats["beta"], "lr": out.stats["lr"],
               "images_per_s": images_per_s}
        row.update({f"batch_{k}": v for k, v in codebook_usage(t.codes, self.cfg.vocab_size).items()})
        return row

    def _global_row(self, out: StepOut, images_per_s: float) -> dict[str, float]:
        """The row over every rank's rows: means of the equal-sized parts, summed code counts."""
        t = out.stats["terms"]
        loss, nll, kl, mse = self.strategy.mean_tensor(torch.stack(
            [t.loss.detach().float().cpu(), t.nll.float().cpu(), t.kl.float().cpu(), t.mse.float().cpu()])).tolist()
        counts = torch.bincount(t.codes.reshape(-1).long().cpu(), minlength=self.cfg.vocab_size)
        row = {"loss": loss, "nll_per_dim": nll, "kl_per_dim": kl, "elb_per_dim": -(nll + kl),
               "recon_mse": mse, "tau": out.stats["tau"], "beta": out.stats["beta"],
               "lr": out.stats["lr"], "images_per_s": images_per_s}
        row.update({f"batch_{k}": v for k, v in usage_of(self.strategy.sum_tensor(counts)).items()})
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
    strategy = data_parallel()  # DataParallel under horovodrun, else LocalStrategy
    seed_everything(seed)
    batches, image_size = train_batches(art, cfg, loader, seed, strategy)
    trainer = DVAETrainer(cfg, batches, image_size, seed, strategy)
    tracker.log_params({"dvae_params": sum(p.numel() for p in trainer.model.parameters())})
    store = LocalStore(art.dvae_state, _resume_config(cfg, image_size, seed))
    loop = Loop("train_dvae", trainer.model, trainer.opt, strategy,
                Cadence(cfg.steps, cfg.log_every, cfg.checkpoint_every, cfg.ema_decay),
                ChiefStore(store, strategy) if strategy.size > 1 else store, tracker,
                trainer.step, trainer.log_row,
                postfix=lambda r: {"mse": f"{r['recon_mse']:.4f}", "ppl": f"{r['batch_perplexity']:.0f}"})
    seconds, _ = loop.run()
    if not strategy.is_chief:  # rank 0 alone evaluates, writes and logs
        return {"steps": cfg.steps, "image_size": image_size, "precision": trainer.precision}
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
    outputs=lambda a: (Out(a.dvae), Out(config_json(a.dvae)), Out(a.dvae_recon, cache=False),
                       Out(a.curves("train_dvae"), cache=False), Out(a.metrics("dvae"), metric=True)),
    summary="the dVAE with gumbel-softmax, logit-Laplace, β and τ annealing, EMA (§2.1, App. A); "
            "data-parallel over Horovod ranks when distributed.num_proc > 1",
    distributed=True, preflight=lambda p: divides(p.dvae.batch_size, p.distributed.num_proc, "dvae"),
)
