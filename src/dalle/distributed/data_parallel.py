"""Plain data parallelism for the image stages (train_dvae, train_clip) on Horovod ranks.

Every rank holds the whole model (the dVAE and the contrastive model are small); `wrap`
broadcasts rank 0's parameters and buffers, `after_backward` averages the gradients over the
ranks (one fused all-reduce), so every rank takes the same AdamW step and the weights stay equal
without further traffic. The EMA is kept on every rank (the same numbers everywhere); checkpoints,
metrics, evaluation and MLflow belong to rank 0 (`ChiefStore`, and the stages).

Equivalence with one process (tests/distributed/test_data_parallel.py): a rank takes rows
[r*B/n, (r+1)*B/n) of the very global batch one process would draw, and a loss term that reads the
whole batch (the dVAE's codebook usage, the contrastive loss) reads every rank's rows through
`gather_rows`, whose backward is the adjoint of the gather; the averaged gradients are then those
of one process on the global batch, to float rounding.

A single process never imports horovod: `data_parallel()` returns the trainers' LocalStrategy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from dalle.distributed.launch import under_horovod
from dalle.errors import CheckpointError, ConfigError
from dalle.train.common import LocalStrategy, resolve_device


def rank_device(name: str, distributed: bool, key: str) -> torch.device:
    """params `<key>` (`device`) on this rank: one GPU per rank, `cuda:<local rank>`, whose
    collectives go through NCCL; `auto` takes the GPU only where Horovod was built with NCCL
    (a Gloo-only build keeps the ranks on CPU tensors, as on this project's CI machine)."""
    dev = resolve_device(name)
    if not distributed or dev.type != "cuda":
        return dev
    from dalle.distributed import horovod as hv

    local = hv.local_rank()
    if not hv.nccl_built():
        if name == "auto":
            return torch.device("cpu")
        raise ConfigError(f"{key}: cuda on Horovod ranks needs Horovod built with "
                          "HOROVOD_GPU_OPERATIONS=NCCL (this one is not); use auto or cpu")
    if local >= torch.cuda.device_count():
        raise ConfigError(f"rank with local rank {local} has no GPU of its own "
                          f"({torch.cuda.device_count()} visible): launch at most one rank per GPU")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


class DataParallel(LocalStrategy):
    """The loop's strategy hooks (dalle.train.common.LocalStrategy) over Horovod ranks."""

    def __init__(self, comm: Any) -> None:
        super().__init__()
        self.comm = comm  # dalle.distributed.horovod.GroupComm over every rank
        self.rank, self.size, self.is_chief = comm.rank, comm.size, comm.rank == 0

    def device(self, name: str, key: str) -> torch.device:
        return rank_device(name, True, key)

    def batch_slice(self, batch_size: int) -> slice:
        """This rank's contiguous rows of a global batch of `batch_size`."""
        if batch_size % self.size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {self.size} "
                              "Horovod ranks (distributed.num_proc)")
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Rank 0's parameters and buffers on every rank."""
        with torch.no_grad():
            for i, t in enumerate([*model.parameters(), *model.buffers()]):
                dense = t.data.contiguous()  # channels_last kernels are not contiguous
                self.comm.broadcast_(dense, 0, f"dp.bcast.{i}")
                t.data.copy_(dense)
        return super().wrap(model)

    @torch.no_grad()
    def after_backward(self) -> None:
        """Average every parameter's gradient over the ranks (a missing gradient counts as 0)."""
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        avg = self.comm.allreduce_mean(torch.cat([g.reshape(-1).float() for g in grads]), "dp.grads")
        for p, g, part in zip(params, grads, avg.split([g.numel() for g in grads])):
            g.copy_(part.view(g.shape))  # in place: the gradient keeps its memory layout
            p.grad = g

    def gather_rows(self, tensor: torch.Tensor, name: str = "dp.rows") -> torch.Tensor:
        """Every rank's rows in rank order, differentiably (the adjoint backward)."""
        return self.comm.gather_rows(tensor, name)

    def mean(self, value: float) -> float:
        return float(self.mean_tensor(torch.tensor([float(value)]))[0])

    def mean_tensor(self, values: torch.Tensor) -> torch.Tensor:
        return self.comm.allreduce_mean(values.detach().cpu().double(), "dp.mean")

    def sum_tensor(self, values: torch.Tensor) -> torch.Tensor:
        return self.comm.allreduce_sum(values.detach().cpu().double(), "dp.sum")

    def agree_min(self, value: int) -> int:
        return self.comm.allreduce_min(value, "dp.agree")

    def agree_all(self, flag: bool) -> bool:
        return self.agree_min(int(flag)) == 1


def divides(batch_size: int, num_proc: int, section: str) -> None:
    """ConfigError unless `<section>.batch_size` splits into equal parts over num_proc ranks."""
    if batch_size % num_proc:
        raise ConfigError(f"{section}.batch_size {batch_size} does not divide by distributed.num_proc "
                          f"{num_proc}: each rank takes an equal part of the global batch")


def data_parallel() -> Union[LocalStrategy, DataParallel]:
    """A DataParallel strategy under horovodrun, else the single-process LocalStrategy."""
    if not under_horovod():
        return LocalStrategy()
    from dalle.distributed import horovod as hv  # the only module that imports horovod

    return DataParallel(hv.init_groups(1).world)


def agreed_precision(strategy: Any, precision: str) -> str:
    """One precision on every rank: a 16-bit one only where every rank chose it."""
    if strategy.size == 1:
        return precision
    codes = ("fp32", "bf16", "fp16")
    mine = codes.index(precision)
    low, high = strategy.agree_min(mine), -strategy.agree_min(-mine)
    return precision if low == high else "fp32"


class ChiefStore:
    """A single-process state store (dalle.train.loop.LocalStore) under data parallelism: rank 0
    saves and removes; every rank resumes from the same file (the ranks' states are equal), and
    a rank that cannot see it (no shared filesystem) stops the run in one line."""

    def __init__(self, inner: Any, strategy: Any) -> None:  # a DataParallel
        self.inner, self.strategy = inner, strategy
        self.path: Optional[Path] = getattr(inner, "path", None)

    def load(self, loop: Any) -> int:
        step = self.inner.load(loop)
        low, high = self.strategy.agree_min(step), -self.strategy.agree_min(-step)
        if low != high:
            raise CheckpointError(f"{self.path}: the ranks found training states at steps {low} "
                                  f"and {high}; rank 0 writes it, so every rank must see the same "
                                  "file (a shared filesystem), or delete it to start over")
        return step

    def save(self, loop: Any) -> None:
        if self.strategy.is_chief:
            self.inner.save(loop)

    def remove(self) -> None:
        if self.strategy.is_chief:
            self.inner.remove()
