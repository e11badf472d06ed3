"""The only module of the project that imports horovod (docs/architecture.md, import boundaries).

`init_groups(shard_group_size)` starts Horovod with the paper's two kinds of groups as
`hvd.ProcessSet`s (§2.5, fig. 5): the ranks of one machine (sharding group: ranks
[g*s, (g+1)*s)) and the ranks holding the same shard index on every machine (data-parallel group:
ranks {j, j+s, j+2s, ...}). A machine is `shard_group_size` consecutive ranks, so two "machines" of
one or two ranks each can be simulated on one host.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import horovod.torch as hvd
import torch

from dalle.errors import ConfigError


class GroupComm:
    """Collectives over one process set (or the global set), named and averaged."""

    def __init__(self, process_set: Any, tag: str) -> None:
        self.ps = process_set
        self.tag = tag
        self.size = process_set.size()
        self.rank = process_set.rank()

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Any:
        return hvd.allgather_async(tensor, name=f"{self.tag}.{name}", process_set=self.ps)

    def wait(self, handle: Any) -> torch.Tensor:
        return hvd.synchronize(handle)

    def reducescatter_mean(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return hvd.reducescatter(tensor, name=f"{self.tag}.{name}", op=hvd.Average,
                                 process_set=self.ps)

    def allreduce_mean(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return hvd.allreduce(tensor, name=f"{self.tag}.{name}", op=hvd.Average, process_set=self.ps)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return hvd.allreduce(tensor, name=f"{self.tag}.{name}", op=hvd.Sum, process_set=self.ps)

    def allreduce_min(self, value: int, name: str) -> int:
        out = hvd.allreduce(torch.tensor([value]), name=f"{self.tag}.{name}", op=hvd.Min,
                            process_set=self.ps)
        return int(out.item())

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> None:
        hvd.broadcast_(tensor, root_rank=root, name=f"{self.tag}.{name}", process_set=self.ps)

    def gather_rows(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Every rank's rows of `tensor` [b, ...] (the same b on every rank), in rank order:
        [size * b, ...], differentiable (see _GatherRows)."""
        out: torch.Tensor = _GatherRows.apply(tensor, self, name)
        return out


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward is its adjoint: each rank's gradient of the gathered
    tensor is summed over ranks (every rank's loss may read every rank's rows) and this rank's
    rows are returned. With the gradients then averaged over ranks, a loss that every rank
    computes on the gathered tensor gets the gradient one process gets on the whole batch."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, comm: GroupComm, name: str) -> torch.Tensor:
        ctx.comm, ctx.name, ctx.rows = comm, name, tensor.shape[0]
        out = comm.wait(comm.allgather_async(tensor.detach().contiguous(), name))
        if out.shape[0] != comm.size * ctx.rows:
            raise RuntimeError(f"gather_rows {name}: ranks hold different numbers of rows")
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        total = ctx.comm.allreduce_sum(grad.contiguous(), f"{ctx.name}.grad")
        start = ctx.comm.rank * ctx.rows
        return total[start:start + ctx.rows], None, None


@dataclass
class Groups:
    world: GroupComm
    shard: Optional[GroupComm]  # None: one rank per machine (no sharding)
    data: Optional[GroupComm]  # None: one machine (no cross-machine reduction)


def init_groups(shard_group_size: int) -> Groups:
    """hvd.init with the sharding and data-parallel process sets of this launch."""
    size = int(os.environ.get("HOROVOD_SIZE", "1"))
    s = shard_group_size
    if size % s:
        raise ConfigError(f"distributed.shard_group_size {s} does not divide the {size} "
                          "launched processes")
    machines = size // s
    shard_sets = [hvd.ProcessSet(list(range(g * s, (g + 1) * s))) for g in range(machines)]
    data_sets = [hvd.ProcessSet(list(range(j, size, s))) for j in range(s)]
    extra = (shard_sets if 1 < s < size else []) + (data_sets if 1 < machines < size else [])
    hvd.init(process_sets=extra)
    rank = hvd.rank()
    world = GroupComm(hvd.global_process_set, "w")
    shard = data = None
    if s > 1:
        shard = world if s == size else GroupComm(shard_sets[rank // s], "s")
    if machines > 1:
        data = world if machines == size else GroupComm(data_sets[rank % s], "d")
    return Groups(world, shard, data)


def local_rank() -> int:
    """This process's index among the ranks of its host (its GPU, when there are GPUs)."""
    return int(hvd.local_rank())


def nccl_built() -> bool:
    """Whether this Horovod build runs collectives on CUDA tensors through NCCL."""
    return bool(hvd.nccl_built())


def shutdown() -> None:
    if hvd.is_initialized():
        hvd.shutdown()




def allgather_object(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order (Horovod started if it was not). Callable
    under torch.inference_mode: Horovod resizes its own output tensors in place, which inference
    tensors refuse."""
    if not hvd.is_initialized():
        hvd.init()
    with torch.inference_mode(False):
        return list(hvd.allgather_object(value))
