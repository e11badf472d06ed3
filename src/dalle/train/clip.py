"""Train the contrastive reranker (paper §2.6) on the clean train split; measure retrieval.

Symmetric InfoNCE with a learned temperature (CLIP), AdamW with linear warm-up and cosine decay.
Caption -> image retrieval top-1 is measured on the val split in seeded random groups of
`clip.retrieval_candidates` (32 on the default: pick the right image among 32). The loop
(dalle.train.loop) makes it resumable, its batch sampler included. The train split is held in
memory when small (batches drawn at random, with replacement) and streamed when not.

Under horovodrun (`distributed.num_proc > 1`) it trains data-parallel
(dalle.distributed.data_parallel): in memory, every rank draws the global batch with the same
sampler and keeps its rows [r*B/n, (r+1)*B/n); the embeddings of every rank are gathered, so each
rank's loss is the global batch's B x B contrastive loss, and the gather's backward (summed over
ranks) with the averaged gradients gives one process's gradient: the weights equal one process's
to float rounding. Streamed, each rank reads B/n samples of its own share of the epoch and the loss
is still over the B gathered pairs. Rank 0 alone checkpoints, evaluates, writes and logs.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Union, cast

import numpy as np
import torch

from dalle.catalog import Artefacts, config_json
from dalle.config_sections import Clip, Loader, Tokenizer
from dalle.distributed.data_parallel import ChiefStore, agreed_precision, data_parallel, divides
from dalle.data.reader import in_batches, split_index
from dalle.data.stream import InMemoryBatches, StreamingBatches, in_memory
from dalle.data.tokenizer import BPETokenizer, load_tokenizer, tokenize
from dalle.errors import DataError
from dalle.io import save_checkpoint, write_json
from dalle.models.clip import ClipConfig, ContrastiveModel, clip_config_dict, contrastive_loss
from dalle.models.config import from_section
from dalle.pixels import to_float
from dalle.stage import Out, StageSpec
from dalle.precision import autocast
from dalle.train import precision_choice
from dalle.train.common import LocalStrategy, cosine_anneal, linear_warmup, seed_everything
from dalle.train.loop import Cadence, LocalStore, Loop, StepOut

log = logging.getLogger(__name__)


@torch.no_grad()
def val_embeddings(model: ContrastiveModel, batches: Iterator[tuple[np.ndarray, list[str]]],
                   tokenizer: BPETokenizer, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The val split's image and caption embeddings, streamed: (img [N, D], txt [N, D]). Only
    the embeddings are kept (8 D bytes a pair, 1 KiB at D = 128), never the images."""
    model.eval()
    imgs, txts = [], []
    for images, captions in batches:
        ids, lengths = tokenize(tokenizer, captions, text_len)
        imgs.append(model.encode_image(to_float(images)))  # [B, D]
        txts.append(model.encode_text(ids, lengths))  # [B, D]
    model.train()
    if not imgs:
        raise DataError("the val split has no readable pair to measure retrieval on")
    return torch.cat(imgs), torch.cat(txts)


def top1_in_groups(img: torch.Tensor, txt: torch.Tensor, order: np.ndarray, group: int) -> float:
    """Caption -> image top-1 within consecutive groups of `group` rows of `order` (a partial
    last group is dropped): img, txt [N, D]."""
    hits = n = 0
    for start in range(0, len(order) - group + 1, group):
        rows = torch.from_numpy(order[start:start + group])
        hits += int((txt[rows] @ img[rows].t()).argmax(dim=1).eq(torch.arange(group)).sum())
        n += group
    if n == 0:
        raise DataError(f"the val split has {len(order)} pairs, fewer than "
                        f"clip.retrieval_candidates={group}")
    return hits / n


def retrieval_top1(img: torch.Tensor, txt: torch.Tensor, group: int, seed: int) -> dict[str, float]:
    """Top-1 among `group`: in seeded random groups of val pairs (`retrieval_top1`, the measure)
    and in consecutive groups of manifest order (`retrieval_top1_manifest_order`: on a set kept in
    name order, such as OpenMoji's, one group holds 26 flags and the other only tone variants)."""
    order = np.random.default_rng(seed).permutation(len(img))
    manifest = np.arange(len(img))
    return {"retrieval_top1": round(top1_in_groups(img, txt, order, group), 4),
            "retrieval_top1_manifest_order": round(top1_in_groups(img, txt, manifest, group), 4)}


def lr_at(cfg: Clip, step: int) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 1% of clip.lr."""
    warm = max(1, cfg.steps // 20)
    return cfg.lr * linear_warmup(step, warm) * cosine_anneal(step, 1.0, 0.01, cfg.steps)


class ClipTrainer:
    """The contrastive model's optimiser, batch sampler and step."""

    def __init__(self, cfg: Clip, model: ContrastiveModel, tokenizer: BPETokenizer, seed: int,
                 strategy: Any = None) -> None:
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.batches: Union[InMemoryBatches, StreamingBatches, None] = None
        self.strategy = cast(Any, strategy or LocalStrategy())  # or data_parallel.DataParallel
        self.strategy.wrap(model)
        self.rows = self.strategy.batch_slice(cfg.batch_size)
        self.opt = torch.optim.AdamW(self.strategy.param_groups(cfg.weight_decay), lr=cfg.lr,
                                     betas=(0.9, 0.98))
        chosen = precision_choice.for_clip_model(cfg.precision, model, self.rows.stop - self.rows.start,
                                                 contrastive_loss).precision
        self.precision = agreed_precision(self.strategy, chosen)
        self.gen = torch.Generator().manual_seed(seed)
        self.loss_sum, self.since_log = 0.0, 0

    def pick(self, step: int, n: int) -> torch.Tensor:
        """In memory: a batch drawn with replacement by the trainer's seeded sampler (every rank
        draws the whole batch and keeps its rows)."""
        idx = torch.randint(n, (min(self.cfg.batch_size, n),), generator=self.gen)
        return idx[self.strategy.batch_slice(len(idx))] if self.strategy.size > 1 else idx

    def step(self, i: int) -> StepOut:
        assert self.batches is not None
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.cfg, i)
        images, captions = self.batches.batch(i)  # uint8 [B, H, W, 3]
        ids, lengths = tokenize(self.tokenizer, captions, self.model.config.text_len)
        with autocast(self.precision, torch.device("cpu")):  # `auto`: measured (dalle.precision)
            img = self.model.encode_image(to_float(images))  # [B, D]
            txt = self.model.encode_text(ids, lengths)  # [B, D]
        img, txt = img.float(), txt.float()
        if self.strategy.size > 1:  # every rank's pairs: the global batch's loss on each rank
            img, txt = self.strategy.gather_rows(img, "clip.img"), self.strategy.gather_rows(txt, "clip.txt")
        loss = contrastive_loss(img, txt, self.model.scale())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.after_backward()  # data parallel: the ranks' mean gradient; else nothing
        self.opt.step()
        self.loss_sum, self.since_log = self.loss_sum + loss.item(), self.since_log + 1
        return StepOut(True, {"lr": lr_at(self.cfg, i)}, len(img))  # the global batch's pairs

    def log_row(self, out: StepOut, images_per_s: float) -> dict[str, float]:
        row = {"loss": self.loss_sum / max(1, self.since_log), "logit_scale": self.model.scale().item(),
               "lr": out.stats["lr"]}
        self.loss_sum, self.since_log = 0.0, 0
        return row

    def extra_state(self) -> dict[str, Any]:
        return {"sampler": self.gen.get_state(), "loss_sum": self.loss_sum, "since_log": self.since_log}

    def load_extra(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["sampler"])
        self.loss_sum, self.since_log = float(state["loss_sum"]), int(state["since_log"])


def train_clip(art: Artefacts, tracker: Any, clip: Clip, loader: Loader, image_size: int,
               tokenizer: Tokenizer, seed: int) -> dict[str, Any]:
    """The `train_clip` stage: the contrastive model, its config and metrics."""
    cfg, tok_cfg = clip, tokenizer
    strategy = data_parallel()  # DataParallel under horovodrun, else LocalStrategy
    seed_everything(seed)
    bpe = load_tokenizer(art.tokenizer)
    index = split_index(art, "train")
    if len(index) < 2:
        raise DataError(f"the train split has {len(index)} images; the contrastive model needs "
                        f"at least 2 (check {art.clean})")
    config = from_section(ClipConfig, cfg, image_size=image_size, vocab_size=tok_cfg.vocab_size,
                          text_len=tok_cfg.text_len)
    trainer = ClipTrainer(cfg, ContrastiveModel(config), bpe, seed, strategy)
    rows = trainer.rows.stop - trainer.rows.start
    trainer.batches = InMemoryBatches(art, "train", loader, trainer.pick) if in_memory(index, loader) \
        else StreamingBatches(index, loader, rows, seed, strategy.rank, strategy.size)
    store = LocalStore(art.clip_state, clip_config_dict(trainer.model))
    loop = Loop("train_clip", trainer.model, trainer.opt, strategy,
                Cadence(cfg.steps, cfg.log_every, cfg.checkpoint_every, cfg.ema_decay),
                ChiefStore(store, strategy) if strategy.size > 1 else store, tracker,
                trainer.step, trainer.log_row, postfix=lambda r: {"loss": f"{r['loss']:.3f}"},
                extra_state=trainer.extra_state, load_extra=trainer.load_extra)
    seconds, _ = loop.run()
    if not strategy.is_chief:  # rank 0 alone evaluates, writes and logs
        return {"train_seconds": round(seconds, 1), "precision": trainer.precision}
    model = trainer.model
    if cfg.ema_decay > 0:
        model.load_state_dict(trainer.strategy.full_state_dict(model, ema=True))
    batches = in_batches(art, "val", cfg.retrieval_candidates, loader.max_bad_fraction)
    img, txt = val_embeddings(model, batches, bpe, tok_cfg.text_len)  # kept: 2 x D floats a pair
    retrieval = retrieval_top1(img, txt, cfg.retrieval_candidates, seed)
    top1 = retrieval["retrieval_top1"]
    save_checkpoint(art.clip, model.state_dict(), clip_config_dict(model))
    write_json(config_json(art.clip), clip_config_dict(model))
    loop.store.remove()
    metrics = {**retrieval, "retrieval_candidates": cfg.retrieval_candidates,
               "chance": round(1.0 / cfg.retrieval_candidates, 4),
               "logit_scale": round(model.scale().item(), 3), "train_seconds": round(seconds, 1),
               "params": sum(p.numel() for p in model.parameters())}
    metrics["precision"] = trainer.precision
    write_json(art.metrics("clip"), metrics)
    tracker.log_metrics(retrieval, step=cfg.steps)
    tracker.register_model("dalle-clip", [art.clip, config_json(art.clip)],
                           description=f"contrastive reranker, val top-1 {top1:.3f}")
    log.info("train_clip: val caption->image top-1 among %d = %.3f", cfg.retrieval_candidates, top1)
    return metrics


STAGE = StageSpec(
    name="train_clip", fn=train_clip,
    params=("clip", "loader", "data.image_size", "tokenizer", "seed"),
    inputs=lambda a: (a.tokenizer, a.clean),
    outputs=lambda a: (Out(a.clip), Out(config_json(a.clip)), Out(a.curves("train_clip"), cache=False),
                       Out(a.metrics("clip"), metric=True)),
    summary="the contrastive reranker (§2.6); data-parallel over Horovod ranks when "
            "distributed.num_proc > 1",
    distributed=True, preflight=lambda p: divides(p.clip.batch_size, p.distributed.num_proc, "clip"),
)
