"""Training batches from a clean split: held in memory when small, streamed when not.

Both paths give a trainer `batch(step) -> (uint8 images [B, H, W, 3], captions)` for the steps
it runs, in order, from any step it resumes at:

* `InMemoryBatches`: the split decoded once into RAM (`dalle.data.reader.load_split`); the
  trainer's own index rule picks each batch (the dVAE: a permutation per epoch as a function of
  (seed, step); the contrastive model: seeded draws). The embedded default takes this path.
* `StreamingBatches`: a DataLoader (`loader.workers` processes decoding) over a `ShardSet`, fed
  by `EpochOrder`: per epoch, chunks of `loader.chunk` consecutive samples (a few shards) are
  shuffled by (seed, epoch) and dealt round-robin to the ranks, the samples inside each chunk
  shuffled too. So a rank never sees a sample twice in an epoch, no two ranks share a sample,
  the order is a function of (seed, epoch, rank, world) alone, and a run resumed at step s skips
  exactly the s x per-rank-batch samples it had consumed (integers, no decoding).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from dalle.catalog import Artefacts
from dalle.config_sections import Loader
from dalle.data.reader import BadSamples, ShardSet, SplitIndex, decoded_mb, load_split

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, list[str]]  # uint8 [B, H, W, 3], captions


class EpochOrder:
    """This rank's sample order, epoch after epoch, from (seed, epoch) alone."""

    def __init__(self, n: int, chunk: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.chunk, self.seed, self.rank, self.world = n, chunk, seed, rank, world
        if n < world:
            raise ValueError(f"{n} samples cannot be split over {world} ranks")

    def epoch(self, e: int) -> np.ndarray:
        """This rank's sample numbers for epoch e, int64 [~n / world] (8 bytes a sample)."""
        rng = np.random.default_rng([self.seed, e])
        starts = np.arange(0, self.n, self.chunk)
        chunks = rng.permutation(len(starts))  # the same draw on every rank
        if len(chunks) < self.world:  # fewer chunks than ranks: deal the samples themselves
            every = np.concatenate([np.arange(starts[c], min(starts[c] + self.chunk, self.n))
                                    for c in chunks])
            return rng.permutation(every[self.rank::self.world])
        return np.concatenate([rng.permutation(np.arange(starts[c], min(starts[c] + self.chunk, self.n)))
                               for c in chunks[self.rank::self.world]])

    def batches(self, per_rank: int, start: int = 0) -> Iterator[list[int]]:
        """Index batches of `per_rank` samples from sample `start` of this rank's stream."""
        e, pos = 0, start
        order = self.epoch(0)
        while pos >= len(order):
            pos -= len(order)
            e += 1
            order = self.epoch(e)
        batch: list[int] = []
        while True:
            take = order[pos:pos + per_rank - len(batch)].tolist()
            batch += take
            pos += len(take)
            if pos >= len(order):
                e, pos = e + 1, 0
                order = self.epoch(e)
            if len(batch) == per_rank:
                yield batch
                batch = []


def _collate(items: list[tuple[Optional[np.ndarray], str, str]]) -> dict[str, Any]:
    good = [(im, cap) for im, cap, _ in items if im is not None]
    bad = [cap for im, cap, _ in items if im is None]
    images = torch.from_numpy(np.stack([g[0] for g in good])) if good else torch.zeros(0, dtype=torch.uint8)
    return {"images": images, "captions": [g[1] for g in good], "bad": bad, "n": len(items)}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a decoding worker: one thread each, the trainer keeps the cores


class StreamingBatches:
    """Per-rank batches streamed from the clean shards (module docstring); the stream starts
    at the first step asked for (the step a resumed run continues from)."""

    def __init__(self, index: SplitIndex, cfg: Loader, per_rank: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.index, self.cfg, self.per_rank = index, cfg, per_rank
        self.order = EpochOrder(len(index), cfg.chunk, seed, rank, world)
        self.bad = BadSamples(cfg.max_bad_fraction, f"{index.split} split")
        self.it: Optional[Iterator[dict[str, Any]]] = None
        self.next_step = 0

    def _start(self, step: int) -> Iterator[dict[str, Any]]:
        workers = self.cfg.workers
        loader = torch.utils.data.DataLoader(
            ShardSet(self.index), batch_sampler=self.order.batches(self.per_rank, step * self.per_rank),
            num_workers=workers, collate_fn=_collate, worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None, persistent_workers=bool(workers),
            generator=torch.Generator().manual_seed(step))  # never draws from the global RNG
        return iter(loader)

    def batch(self, step: int) -> Batch:
        if self.it is None or step != self.next_step:
            self.it = self._start(step)
        out = next(self.it)
        self.next_step = step + 1
        self.bad.add(out["n"], len(out["bad"]), out["bad"][0] if out["bad"] else None)
        return out["images"], out["captions"]


class InMemoryBatches:
    """The split in RAM; `pick(step, n) -> indices` chooses each batch."""

    def __init__(self, art: Artefacts, split: str, cfg: Loader,
                 pick: Callable[[int, int], torch.Tensor]) -> None:
        data = load_split(art, split, cfg.max_bad_fraction)
        self.images = torch.from_numpy(data.images)  # uint8 [N, H, W, 3]
        self.captions = data.captions
        self.pick = pick

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, step: int) -> Batch:
        idx = self.pick(step, len(self.captions))
        return self.images[idx], [self.captions[i] for i in idx.tolist()]


def in_memory(index: SplitIndex, cfg: Loader) -> bool:
    """Whether the split fits the in-memory path (`loader.in_memory_max_mb`, decoded)."""
    return decoded_mb(index) <= cfg.in_memory_max_mb
