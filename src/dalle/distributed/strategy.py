"""The distributed strategy a training loop plugs in (paper §2.5): sharding + PowerSGD on Horovod.

A loop uses it as:

    strategy = ShardedStrategy.from_config(params.distributed)   # no horovod import at num_proc 1
    strategy.wrap(model)                         # model.blocks: the resblocks to shard
    opt = AdamW(strategy.parameters(), ...)      # 1/n slices only
    for step:
        strategy.before_forward()
        loss = loss_fn(model, batch[strategy.batch_slice(B)]); loss.backward()
        strategy.after_backward()                # reduce-scatter (in backward) + PowerSGD/allreduce
        strategy.clip_grad_norm_(4.0); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from dalle.config_sections import Distributed
from dalle.distributed.data_parallel import rank_device
from dalle.distributed.launch import under_horovod
from dalle.distributed.powersgd import PowerSGD, shard_rank
from dalle.distributed.sharding import (FlatShard, LocalComm, Prefetcher, ShardedRest, iter_shards,
                                        shard_blocks)
from dalle.errors import CheckpointError, ConfigError
from dalle.train.common import named_decays


class ShardedStrategy:
    def __init__(self, cfg: Distributed, groups: Any = None, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed  # seed: PowerSGD's fixed Q (params `seed`)
        self.world = groups.world if groups is not None else None
        self.shard_comm = (groups.shard if groups is not None and groups.shard else LocalComm())
        self.data = groups.data if groups is not None else None
        self.psgd: Optional[PowerSGD] = None
        self.shards: list[FlatShard] = []
        self.prefetcher: Optional[Prefetcher] = None
        self.rest: Optional[ShardedRest] = None
        self.wire_bytes_last = 0  # bytes this rank sent across machines in the last step
        self.dense: dict[str, torch.Tensor] = {}  # uncompressed slot gradients of this step (sink)
        self.nonfinite = False  # the sink dropped non-finite values this step: skip it
        self.ema: list[torch.Tensor] = []  # EMA of this rank's slices (paper §2.2: iterate averaging)

    @classmethod
    def from_config(cls, cfg: Distributed, seed: int = 0) -> "ShardedStrategy":
        """Under horovodrun: init Horovod and its process sets; otherwise a single process."""
        if not under_horovod():
            return cls(cfg, seed=seed)
        from dalle.distributed import horovod as hv  # the only module that imports horovod

        return cls(cfg, hv.init_groups(cfg.shard_group_size), seed)

    # ------------------------------------------------------------------ topology
    def device(self, name: str) -> torch.device:
        """params `prior.device` on this rank (dalle.distributed.data_parallel.rank_device)."""
        return rank_device(name, self.world is not None, "prior.device")

    @property
    def rank(self) -> int:
        return self.world.rank if self.world else 0

    @property
    def size(self) -> int:
        return self.world.size if self.world else 1

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def batch_slice(self, batch_size: int) -> slice:
        """This rank's part of a global batch (every rank sees different examples)."""
        if batch_size % self.size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {self.size} processes")
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Broadcast rank 0's weights, then shard model.blocks and the remaining parameters."""
        if self.world is not None:
            for i, p in enumerate(model.parameters()):
                self.world.broadcast_(p.data, 0, f"bcast.{i}")
        blocks = model.blocks
        assert isinstance(blocks, nn.ModuleList), "the model keeps its resblocks in model.blocks"
        if getattr(model, "checkpointing", False):
            setattr(model, "checkpointing", False)  # ShardedBlock already recomputes each block (§2.4)
        # the one weight-decay rule (dalle.train.common.decays), as a single process applies it
        decay = frozenset(id(p) for p, d in named_decays(model) if d)
        self.prefetcher = shard_blocks(blocks, self.shard_comm, decay)
        self.rest = ShardedRest(model, self.shard_comm, decay)
        self.shards = list(iter_shards(model)) + [self.rest.shard]
        ps = self.cfg.powersgd
        if ps.enabled and self.data is not None:
            shapes = {f"{i}.{s.name}": s.shard_shape for i, sh in enumerate(self.shards) for s in sh.slots}
            # only the resblocks' matrices are compressed (Table 1's formula); the rest goes dense
            rest = {f"{len(self.shards) - 1}.{s.name}" for s in self.rest.shard.slots}
            self.psgd = PowerSGD(shapes, shard_rank(ps.rank, self.shard_comm.size), ps.min_compression_dim,
                                 ps.error_feedback, self.seed, ps.eps, device=self.rest.shard.device,
                                 dtype=ps.dtype, uncompressed=rest)
            if ps.error_feedback:  # §2.5: the gradient goes into the error buffers during backprop
                for i, sh in enumerate(self.shards):
                    sh.sink = self._sink(i, sh)
        return model

    def _sink(self, index: int, shard: FlatShard) -> Callable[[torch.Tensor, float], bool]:
        """Where shard `index`'s averaged slice gradient [L] goes during backprop: compressed slots
        into their error buffers, the others into small dense buffers, all in true units."""
        psgd = self.psgd
        assert psgd is not None

        @torch.no_grad()
        def sink(grad: torch.Tensor, scale: float) -> bool:
            ok = True
            for s in shard.slots:
                name, view = f"{index}.{s.name}", grad[s.offset:s.offset + s.shard_numel].view(s.shard_shape)
                if psgd.plans[name].rank:
                    ok = psgd.accumulate(name, view, scale) and ok
                    continue
                value = view.float() / scale
                if not bool(torch.isfinite(value).all()):
                    value, ok = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0), False
                self.dense[name] = self.dense[name].add_(value) if name in self.dense else value
            self.nonfinite = self.nonfinite or not ok
            return ok

        return sink

    def parameters(self) -> list[nn.Parameter]:
        return [p for sh in self.shards for p in sh.params]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: the weight-matrix pieces decay, gains/biases/embeddings do not."""
        pieces = [(p, d) for sh in self.shards for p, d in zip(sh.params, sh.decays)]
        return [{"params": [p for p, d in pieces if d], "weight_decay": weight_decay},
                {"params": [p for p, d in pieces if not d], "weight_decay": 0.0}]

    def grads(self) -> list[torch.Tensor]:
        """The slices' gradients (zeros where a slice got none), in parameters() order."""
        return [g for sh in self.shards for g in sh.grad_pieces()]

    def _wrapped(self) -> tuple[Prefetcher, ShardedRest]:
        if self.prefetcher is None or self.rest is None:
            raise RuntimeError("ShardedStrategy.wrap(model) must be called first")
        return self.prefetcher, self.rest

    def before_forward(self) -> None:
        prefetcher, rest = self._wrapped()
        prefetcher.drain()
        rest.materialize()
        self.nonfinite = False

    def after_backward(self) -> None:
        """Reduce-scatter the rest; agree on non-finite blocks; average across machines."""
        prefetcher, rest = self._wrapped()
        rest.scatter_grads()
        if self.psgd is not None and self.psgd.error_feedback:
            return self._reduce_accumulated(prefetcher)
        grads = self.grads()
        scales = self._agree_grad_scales(prefetcher)
        if self.data is None:
            self.wire_bytes_last = 0
            return
        self._rescale(prefetcher, scales, inverse=True)  # PowerSGD/error buffers in true units
        if self.psgd is not None:
            named = {f"{i}.{k}": v for i, sh in enumerate(self.shards)
                     for k, v in sh.views(sh.grad_pieces()).items()}
            data = self.data
            self.psgd.reduce(named, data.allreduce_mean, lambda e: -data.allreduce_min(-e, "psgd.exp"),
                             data.size)
            self.wire_bytes_last = self.psgd.wire_bytes()
        else:
            flat = torch.cat(grads)
            avg = self.data.allreduce_mean(flat, "grads")
            for g, part in zip(grads, avg.split([g.numel() for g in grads])):
                g.copy_(part)
            self.wire_bytes_last = 4 * flat.numel()
        self._rescale(prefetcher, scales, inverse=False)  # the loop's scaler unscales them

    def _reduce_accumulated(self, prefetcher: Prefetcher) -> None:
        """PowerSGD on the error buffers the backward pass filled (§2.5): the decompressed average
        (and the dense slots' all-reduce) lands in freshly allocated slice gradients."""
        psgd, data = self.psgd, self.data
        assert psgd is not None and data is not None
        scales = self._agree_grad_scales(prefetcher)  # flags set by the sink; allocates .grad
        if self.world is not None:  # every rank skips the step when any dropped non-finite values
            self.nonfinite = bool(self.world.allreduce_sum(torch.tensor([float(self.nonfinite)]), "nonfinite")[0])
        named = {f"{i}.{k}": v for i, sh in enumerate(self.shards) for k, v in sh.views(sh.grad_pieces()).items()}
        for name, value in self.dense.items():
            named[name].copy_(value.view_as(named[name]))
        self.dense.clear()
        psgd.reduce(named, data.allreduce_mean, lambda e: -data.allreduce_min(-e, "psgd.exp"), data.size)
        self.wire_bytes_last = psgd.wire_bytes()
        self._rescale(prefetcher, scales, inverse=False)  # the loop's scaler unscales them

    def _agree_grad_scales(self, prefetcher: Prefetcher) -> list[float]:
        """Per-resblock gradient scaling (paper §2.4) across ranks: a block that saw non-finite
        values on ANY rank is marked bad everywhere, so every rank skips the same steps and keeps
        the same scales (the reduce-scatter sums gradients in scaled units)."""
        states = [b.grad_scale for b in prefetcher.blocks]
        if all(s is None for s in states):
            return []
        bad = torch.tensor([float(s is not None and (bool(s.bad) or not all(
            bool(torch.isfinite(g).all()) for g in b.shard.grad_pieces())))
            for s, b in zip(states, prefetcher.blocks)])
        if self.world is not None:
            bad = self.world.allreduce_sum(bad, "gscale.bad")
        for s, flag in zip(states, bad.tolist()):
            if s is not None:
                s.bad = torch.tensor(flag > 0)
        return [s.scale if s is not None else 1.0 for s in states]

    @torch.no_grad()
    def _rescale(self, prefetcher: Prefetcher, scales: list[float], inverse: bool) -> None:
        for block, scale in zip(prefetcher.blocks, scales):
            if scale != 1.0:
                for g in block.shard.grad_pieces():
                    g.mul_(1.0 / scale if inverse else scale)

    def agree_all(self, flag: bool) -> bool:
        """True only when `flag` is true on every rank."""
        return self.agree_min(int(flag)) == 1 if self.world else flag

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm over the whole model (slices summed over the sharding group); inf
        when the backward dropped non-finite values (the step is skipped)."""
        if self.nonfinite:
            return float("inf")
        grads = self.grads()
        sq = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
        if self.shard_comm.size > 1:
            sq = self.shard_comm.allreduce_sum(sq.reshape(1), "gnorm")[0]
        norm = math.sqrt(float(sq))
        if math.isfinite(norm) and norm > max_norm:
            for g in grads:
                g.mul_(max_norm / (norm + 1e-6))
        return norm

    def mean(self, value: float) -> float:
        if self.world is None:
            return value
        return float(self.world.allreduce_mean(torch.tensor([float(value)]), "metric")[0])

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * param, on the 1/n slices only."""
        if not self.ema:
            self.ema = [p.detach().clone() for p in self.parameters()]
            return
        for e, p in zip(self.ema, self.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)

    def full_state_dict(self, model: nn.Module, ema: bool = False) -> dict[str, torch.Tensor]:
        """The full weights (or their EMA), named as in the unsharded model (collective)."""
        prefetcher, rest = self._wrapped()
        ema_flats = iter(self.ema if ema and self.ema else [])
        by_shard: dict[int, Optional[torch.Tensor]] = {}
        for sh in self.shards:
            pieces = [next(ema_flats) for _ in sh.params] if ema and self.ema else []
            by_shard[id(sh)] = torch.cat(pieces) if pieces else None
        out: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if module in prefetcher.blocks:
                full = module.shard.gather(f"agfull.{module.index}", by_shard[id(module.shard)])
                out.update({f"{name}.{k}": v.clone() for k, v in full.items()})
        full = rest.shard.gather("agfull.rest", by_shard[id(rest.shard)])
        out.update({k: v.clone() for k, v in full.items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's training state beyond the optimiser: EMA slices, PowerSGD error buffers."""
        return {"powersgd": self.psgd.state_dict() if self.psgd else {}, "ema": list(self.ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = [e.clone() for e in state.get("ema") or []]
        errors = state.get("powersgd") or {}
        if self.psgd is not None:
            missing = set(self.psgd.errors) - set(errors)
            if errors and missing:
                raise CheckpointError(f"checkpoint lacks PowerSGD error buffer {sorted(missing)[0]}")
            self.psgd.load_state_dict(errors)

    def agree_min(self, value: int) -> int:
        return self.world.allreduce_min(value, "agree") if self.world else value


def strategy_for(cfg: Distributed, seed: int) -> Optional[ShardedStrategy]:
    """What a stage hands its trainer: a ShardedStrategy on Horovod ranks, None (the trainer's
    single-process default, no horovod import) otherwise."""
    return ShardedStrategy.from_config(cfg, seed) if under_horovod() else None
