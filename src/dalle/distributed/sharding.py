"""Parameter sharding within a machine (paper §2.5, fig. 5).

Each of the n ranks of a sharding group owns a 1/n slice of every parameter of a resblock, packed
into ONE flat buffer (so its Adam/EMA state is 1/n too). A resblock's full parameters exist only
while it computes: they are all-gathered just before use (the next block's gather is already in
flight - prefetch), discarded after; in the backward pass they are gathered again, the block is
recomputed (activation checkpointing, paper §2.4) and its parameter gradients are reduce-scattered
so each rank ends with the group-averaged gradient of its own slice.

Matrices are sliced along their larger axis (ties: dim 0), as in App. E.1: a d x d attention
matrix becomes d x (d/n), the MLP's 4d x d and d x 4d both keep d and slice 4d; 1-D parameters
(and matrices the axis does not divide) are sliced flat with zero padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call


class ShardComm(Protocol):
    """Collectives over the sharding group (dalle.distributed.horovod.GroupComm implements it)."""

    size: int
    rank: int

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Any: ...

    def wait(self, handle: Any) -> torch.Tensor: ...

    def reducescatter_mean(self, tensor: torch.Tensor, name: str) -> torch.Tensor: ...

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor: ...


class LocalComm:
    """The group of one: gathers and reduce-scatters are identities (single process)."""

    size = 1
    rank = 0

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Any:
        return tensor

    def wait(self, handle: Any) -> torch.Tensor:
        return handle

    def reducescatter_mean(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    axis: Optional[int]  # None: flat (padded) slicing
    shard_shape: tuple[int, ...]
    offset: int  # into the rank's flat buffer

    @property
    def shard_numel(self) -> int:
        n = 1
        for s in self.shard_shape:
            n *= s
        return n


def shard_axis(shape: Sequence[int], n: int) -> Optional[int]:
    """The larger axis of a matrix if n divides it (else the other one), None for flat slicing."""
    if len(shape) != 2:
        return None
    order = (0, 1) if shape[0] >= shape[1] else (1, 0)
    return next((ax for ax in order if shape[ax] % n == 0), None)


def make_slots(named: Sequence[tuple[str, Sequence[int]]], n: int) -> list[Slot]:
    slots, offset = [], 0
    for name, size in named:
        shape = tuple(size)
        axis = shard_axis(shape, n)
        if axis is None:
            numel = 1
            for s in shape:
                numel *= s
            shard_shape: tuple[int, ...] = (-(-numel // n),)  # ceil: zero padding on the last rank
        else:
            shard_shape = tuple(s // n if i == axis else s for i, s in enumerate(shape))
        slot = Slot(name, shape, axis, shard_shape, offset)
        slots.append(slot)
        offset += slot.shard_numel
    return slots


def split_full(full: torch.Tensor, slot: Slot, n: int) -> list[torch.Tensor]:
    """A full tensor -> the n flat slices of its ranks."""
    if slot.axis is not None:
        return [c.reshape(-1) for c in full.chunk(n, dim=slot.axis)]
    flat = full.reshape(-1)
    pad = slot.shard_numel * n - flat.numel()
    return list(torch.cat([flat, flat.new_zeros(pad)]).chunk(n)) if pad else list(flat.chunk(n))


def merge_slices(slices: Sequence[torch.Tensor], slot: Slot) -> torch.Tensor:
    """The n flat slices (rank order) -> the full tensor."""
    if slot.axis is not None:
        return torch.cat([s.view(slot.shard_shape) for s in slices], dim=slot.axis)
    numel = 1
    for s in slot.shape:
        numel *= s
    return torch.cat(list(slices))[:numel].view(slot.shape)


# Paper App. E.1: q, k and v are three d x d matrices, each sharded and compressed on its own; a
# fused [3d, d] qkv weight is laid out as three slots "<name>#0..2" so sharding and PowerSGD see
# exactly the paper's matrices.
FUSED = {"qkv.weight": 3}


def fused_parts(name: str, shape: Sequence[int]) -> int:
    for suffix, k in FUSED.items():
        if name.endswith(suffix) and len(shape) == 2 and shape[0] == k * shape[1]:
            return k
    return 1


def shard_shapes(named: Sequence[tuple[str, Sequence[int]]], n: int) -> dict[str, tuple[int, ...]]:
    """{slot name: this rank's slice shape} of parameters (fused qkv split), for planning on the
    meta device: what sharding over n ranks hands to PowerSGD."""
    logical: list[tuple[str, Sequence[int]]] = []
    for name, shape in named:
        k = fused_parts(name, shape)
        logical += ([(f"{name}#{j}", (shape[0] // k, shape[1])) for j in range(k)] if k > 1
                    else [(name, shape)])
    return {s.name: s.shard_shape for s in make_slots(logical, n)}


class FlatShard:
    """This rank's flat slice [L] of a list of parameters, plus pack/unpack for collectives.

    The slice is held as up to two Parameters: first the slots of parameters in `decay` (weight
    matrices: AdamW's decoupled weight decay, paper App. B.2), then the others, so an optimiser
    can give the two pieces different param groups.
    """

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], comm: ShardComm,
                 decay: frozenset[int] = frozenset()) -> None:
        self.comm = comm
        n = comm.size
        self.parts = {k: fused_parts(k, v.shape) for k, v in named}
        decayed = {k for k, v in named if id(v) in decay}
        logical = self._to_slots({k: v.detach().float() for k, v in named})
        order = sorted(logical, key=lambda slot: slot.split("#")[0] not in decayed)  # stable
        self.slots = make_slots([(k, logical[k].shape) for k in order], n)
        self.numel = sum(s.shard_numel for s in self.slots)
        self.n_decay = sum(s.shard_numel for s in self.slots if s.name.split("#")[0] in decayed)
        mine = [split_full(logical[s.name], s, n)[comm.rank] for s in self.slots]
        self.device = next((v.device for _, v in named), torch.device("cpu"))
        flat = torch.cat(mine) if mine else torch.zeros(0, device=self.device)  # [L]
        pieces = [(flat[:self.n_decay], True), (flat[self.n_decay:], False)]
        self.params = [nn.Parameter(t.clone()) for t, _ in pieces if t.numel()]
        self.decays = [d for t, d in pieces if t.numel()]
        self.sizes = [p.numel() for p in self.params]
        # where this rank's averaged slice gradient [L] goes as soon as the reduce-scatter lands,
        # with the block's gradient scale: None = the parameters' .grad; PowerSGD's error buffers
        # otherwise (paper §2.5: accumulated during backprop, no separate buffers). It returns
        # False when it dropped non-finite values.
        self.sink: Optional[Callable[[torch.Tensor, float], bool]] = None

    def flat(self) -> torch.Tensor:
        """This rank's slice [L] (a copy when it has two pieces)."""
        if len(self.params) == 1:
            return self.params[0].detach()
        return (torch.cat([p.detach() for p in self.params]) if self.params
                else torch.zeros(0, device=self.device))

    def grad_pieces(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params if p.grad is not None]

    def set_grad(self, flat: torch.Tensor) -> None:
        for p, g in zip(self.params, flat.split(self.sizes)):
            p.grad = g.view_as(p)

    def _to_slots(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, k in self.parts.items():
            if k == 1:
                out[name] = full[name]
            else:
                out.update({f"{name}#{j}": part for j, part in enumerate(full[name].chunk(k, 0))})
        return out

    def _from_slots(self, slots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: slots[name] if k == 1 else torch.cat([slots[f"{name}#{j}"] for j in range(k)])
                for name, k in self.parts.items()}

    def unpack(self, gathered: torch.Tensor) -> dict[str, torch.Tensor]:
        """All-gathered [n*L] -> {name: full tensor}."""
        per_rank = gathered.view(self.comm.size, self.numel)  # [n, L]
        return self._from_slots({s.name: merge_slices(
            per_rank[:, s.offset:s.offset + s.shard_numel].unbind(0), s) for s in self.slots})

    def pack(self, full: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: full tensor} -> [n*L], rank-major, ready for a reduce-scatter."""
        n = self.comm.size
        logical = self._to_slots({k: v.float() for k, v in full.items()})
        parts = [split_full(logical[s.name], s, n) for s in self.slots]  # [slot][rank]
        return torch.cat([parts[i][r] for r in range(n) for i in range(len(self.slots))])

    def views(self, flat: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{slot: shard-shaped view} of a [L] buffer or of per-piece buffers (grads, EMA, ...)."""
        pieces = list(flat.split(self.sizes)) if isinstance(flat, torch.Tensor) else list(flat)
        out = {}
        for s in self.slots:
            i, off = (0, s.offset) if s.offset < self.n_decay or not self.n_decay else (1, s.offset - self.n_decay)
            i = min(i, len(pieces) - 1)
            out[s.name] = pieces[i][off:off + s.shard_numel].view(s.shard_shape)
        return out

    def gather(self, name: str, flat: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Full tensors of this rank's slice `flat` (default: the parameters) and its peers'."""
        flat = self.flat() if flat is None else flat
        return self.unpack(self.comm.wait(self.comm.allgather_async(flat, name)))


# ----------------------------------------------------------------------------- resblocks
class Prefetcher:
    """Keeps the next block's all-gather in flight while the current block computes."""

    def __init__(self, comm: ShardComm) -> None:
        self.comm = comm
        self.blocks: list["ShardedBlock"] = []
        self.pending: dict[int, Any] = {}
        self.gathers = 0

    def _issue(self, i: int) -> None:
        if 0 <= i < len(self.blocks) and i not in self.pending:
            self.pending[i] = self.comm.allgather_async(self.blocks[i].shard.flat(), f"ag.{i}")
            self.gathers += 1

    def full_params(self, i: int, direction: int) -> dict[str, torch.Tensor]:
        """Block i's full parameters; starts the gather of block i + direction (+1 fwd, -1 bwd)."""
        self._issue(i)
        handle = self.pending.pop(i)
        self._issue(i + direction)
        return self.blocks[i].shard.unpack(self.comm.wait(handle))

    def drain(self) -> None:
        """Finish stray prefetches (parameters are about to change)."""
        for handle in self.pending.values():
            self.comm.wait(handle)
        self.pending.clear()


def autocast_state(device_type: str) -> dict[str, Any]:
    """The autocast state in force on `device_type`, as torch.autocast keyword arguments (what
    torch.utils.checkpoint restores for its recompute: 16-bit forward, 16-bit recompute)."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}


class _GatherCompute(torch.autograd.Function):
    """y = block(x, *args) with the block's parameters gathered from the slices `pieces`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: "ShardedBlock", kwargs: dict[str, Any],
                n_pieces: int, *rest: Any) -> torch.Tensor:
        args = rest[n_pieces:]  # rest = (*pieces, *args): pieces are inputs only for their grads
        ctx.block, ctx.args, ctx.kwargs, ctx.n_pieces = block, args, kwargs, n_pieces
        ctx.autocast = autocast_state(x.device.type)  # the recompute runs as the forward did (§2.4)
        ctx.save_for_backward(x)
        params = block.prefetcher.full_params(block.index, +1)
        with torch.no_grad():
            out = functional_call(block.inner, params, (x, *args), kwargs)
        return out  # full params go out of scope here: freed

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        block = ctx.block
        params = {k: v.requires_grad_() for k, v in
                  block.prefetcher.full_params(block.index, -1).items()}
        x = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad(), torch.autocast(**ctx.autocast):  # recompute (checkpointing, §2.4)
            out = functional_call(block.inner, params, (x, *ctx.args), ctx.kwargs)
        inputs = ([x] if x.requires_grad else []) + list(params.values())
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        gx = grads[0] if x.requires_grad else None
        pg = {k: (g if g is not None else torch.zeros_like(v))
              for (k, v), g in zip(params.items(), grads[len(inputs) - len(params):])}
        g_shard = block.shard.comm.reducescatter_mean(block.shard.pack(pg), f"rs.{block.index}")  # [L]
        if block.shard.sink is not None:  # straight into the error buffers: no .grad allocated
            state = block.grad_scale
            if not block.shard.sink(g_shard, state.scale if state is not None else 1.0) and state is not None:
                state.bad = torch.ones((), dtype=torch.bool)  # this block's scale backs off (§2.4)
            pieces: list[Optional[torch.Tensor]] = [None] * len(block.shard.params)
        else:
            pieces = [g.view_as(p) for g, p in zip(g_shard.split(block.shard.sizes), block.shard.params)]
        return (gx, None, None, None, *pieces, *([None] * len(ctx.args)))


class ShardedBlock(nn.Module):
    """Drop-in replacement of a resblock whose parameters live sharded across the group."""

    def __init__(self, inner: nn.Module, index: int, prefetcher: Prefetcher,
                 decay: frozenset[int] = frozenset()) -> None:
        super().__init__()
        named = list(inner.named_parameters())
        self.shard = FlatShard(named, prefetcher.comm, decay)
        self.flats = nn.ParameterList(self.shard.params)  # the optimizer sees only the 1/n slice
        for _, p in named:
            p.data = torch.empty(0, device=p.device)  # the full copy is dropped; functional_call supplies it
            p.requires_grad_(False)
        self.inner: nn.Module
        object.__setattr__(self, "inner", inner)  # not a submodule: keeps its params out of ours
        self.prefetcher: Prefetcher
        object.__setattr__(self, "prefetcher", prefetcher)
        self.index = index

    @property
    def grad_scale(self) -> Any:
        """The inner block's per-resblock gradient scale (paper §2.4), so a ResblockScaler built
        on the sharded model.blocks scales the recomputed branch and unscales the slice grads."""
        return getattr(self.inner, "grad_scale", None)

    @grad_scale.setter
    def grad_scale(self, state: Any) -> None:
        self.inner.grad_scale = state

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Extra arguments (masks, flags) are passed through as constants (no gradient)."""
        pieces = list(self.flats)
        return _GatherCompute.apply(x, self, kwargs, len(pieces), *pieces, *args)


def shard_blocks(blocks: nn.ModuleList, comm: ShardComm, decay: frozenset[int] = frozenset()) -> Prefetcher:
    """Replace every block of `blocks` in place by its ShardedBlock; returns their prefetcher.
    `decay`: ids of the parameters that get weight decay (kept in a separate piece)."""
    pre = Prefetcher(comm)
    for i in range(len(blocks)):
        sb = ShardedBlock(blocks[i], i, pre, decay)
        pre.blocks.append(sb)
        blocks[i] = sb
    return pre


def iter_shards(model: nn.Module) -> Iterator[FlatShard]:
    for module in model.modules():
        if isinstance(module, ShardedBlock):
            yield module.shard


class ShardedRest:
    """The parameters outside the resblocks (embeddings, final norm, head), sharded the same way:
    gathered into the module once before the forward pass, reduce-scattered and dropped after the
    backward pass, so only their 1/n slice (and its optimiser state) persists between steps."""

    def __init__(self, model: nn.Module, comm: ShardComm, decay: frozenset[int] = frozenset()) -> None:
        sharded = {id(p) for s in iter_shards(model) for p in s.params}
        self.named = [(k, p) for k, p in model.named_parameters()
                      if p.requires_grad and id(p) not in sharded]
        self.shapes = {k: p.shape for k, p in self.named}
        self.shard = FlatShard(self.named, comm, decay)
        self.release()

    def materialize(self) -> None:
        full = self.shard.gather("ag.rest")
        for name, p in self.named:
            p.data = full[name]
            p.grad = None

    def scatter_grads(self) -> None:
        dev = self.shard.device
        full = {k: (p.grad if p.grad is not None else torch.zeros(self.shapes[k], device=dev))
                for k, p in self.named}
        grad = self.shard.comm.reducescatter_mean(self.shard.pack(full), "rs.rest")
        if self.shard.sink is not None:
            self.shard.sink(grad, 1.0)
        else:
            self.shard.set_grad(grad)
        self.release()

    def release(self) -> None:
        for _, p in self.named:
            p.data = torch.empty(0, device=p.device)
            p.grad = None
