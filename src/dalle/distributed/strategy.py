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
from typing import Any, Optional

import torch
from torch import nn

from dalle.config_sections import Distributed
from dalle.distributed.powersgd import PowerSGD, shard_rank
from dalle.distributed.sharding import (FlatShard, LocalComm, Prefetcher, ShardedRest, iter_shards,
                                        shard_blocks)
from dalle.errors import CheckpointError


class ShardedStrategy:
    def __init__(self, cfg: Distributed, groups: Any = None) -> None:
        self.cfg = cfg
        self.world = groups.world if groups is not None else None
        self.shard_comm = (groups.shard if groups is not None and groups.shard else LocalComm())
        self.data = groups.data if groups is not None else None
        self.psgd: Optional[PowerSGD] = None
        self.shards: list[FlatShard] = []
        self.prefetcher: Optional[Prefetcher] = None
        self.rest: Optional[ShardedRest] = None
        self.wire_bytes_last = 0  # bytes this rank sent across machines in the last step
        self.ema: list[torch.Tensor] = []  # EMA of this rank's slices (paper §2.2: iterate averaging)

    @classmethod
    def from_config(cls, cfg: Distributed) -> "ShardedStrategy":
        """Under horovodrun: init Horovod and its process sets; otherwise a single process."""
        from dalle.distributed.launch import under_horovod

        if not under_horovod():
            return cls(cfg)
        from dalle.distributed import horovod as hv

        return cls(cfg, hv.init_groups(cfg.shard_group_size))

    # ------------------------------------------------------------------ topology
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
            from dalle.errors import ConfigError

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
            model.checkpointing = False  # ShardedBlock already recomputes each block (§2.4)
        self.prefetcher = shard_blocks(blocks, self.shard_comm)
        self.rest = ShardedRest(model, self.shard_comm)
        self.shards = list(iter_shards(model)) + [self.rest.shard]
        ps = self.cfg.powersgd
        if ps.enabled and self.data is not None:
            shapes = {f"{i}.{s.name}": s.shard_shape for i, sh in enumerate(self.shards) for s in sh.slots}
            self.psgd = PowerSGD(shapes, shard_rank(ps.rank, self.shard_comm.size), ps.min_compression_dim,
                                 ps.error_feedback, ps.seed, ps.eps)
        return model

    def parameters(self) -> list[nn.Parameter]:
        return [sh.param for sh in self.shards]

    def grads(self) -> list[torch.Tensor]:
        """The slices' gradients (zeros where a slice got none)."""
        for sh in self.shards:
            if sh.param.grad is None:
                sh.param.grad = torch.zeros_like(sh.param)
        return [sh.param.grad for sh in self.shards if sh.param.grad is not None]

    def _wrapped(self) -> tuple[Prefetcher, ShardedRest]:
        if self.prefetcher is None or self.rest is None:
            raise RuntimeError("ShardedStrategy.wrap(model) must be called first")
        return self.prefetcher, self.rest

    def before_forward(self) -> None:
        prefetcher, rest = self._wrapped()
        prefetcher.drain()
        rest.materialize()

    def after_backward(self) -> None:
        """Reduce-scatter the rest; average across machines (PowerSGD or plain all-reduce)."""
        self._wrapped()[1].scatter_grads()
        grads = self.grads()
        if self.data is None:
            self.wire_bytes_last = 0
            return
        if self.psgd is not None:
            named = {f"{i}.{k}": v for i, (sh, g) in enumerate(zip(self.shards, grads))
                     for k, v in sh.views(g).items()}
            self.psgd.reduce(named, self.data.allreduce_mean)
            self.wire_bytes_last = self.psgd.wire_bytes()
            return
        flat = torch.cat(grads)
        avg = self.data.allreduce_mean(flat, "grads")
        for g, part in zip(grads, avg.split([g.numel() for g in grads])):
            g.copy_(part)
        self.wire_bytes_last = 4 * flat.numel()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm over the whole model (slices summed over the sharding group)."""
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
        prefetcher, rest_shard = self._wrapped()[0], self._wrapped()[1].shard
        flats: list[Optional[torch.Tensor]] = list(self.ema) if ema and self.ema else [None] * len(self.shards)
        by_shard = dict(zip(map(id, self.shards), flats))
        out: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if module in prefetcher.blocks:
                full = module.shard.gather(f"agfull.{module.index}", by_shard[id(module.shard)])
                out.update({f"{name}.{k}": v.clone() for k, v in full.items()})
        rest = rest_shard.gather("agfull.rest", by_shard[id(rest_shard)])
        out.update({k: v.clone() for k, v in rest.items()})
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
