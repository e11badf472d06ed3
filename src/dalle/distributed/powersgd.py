"""PowerSGD gradient compression across machines (paper §2.5, App. E; Vogels et al. 2019).

Each rank's shard gradient matrix M [rows, cols] is compressed to rank k. With error feedback the
gradient is accumulated INTO the error buffer during backpropagation (`accumulate`, called from
the sharded backward as each block's reduce-scatter lands: no separate gradient buffer for a
compressed matrix, §2.5), and the buffer then serves as M:

    P = M Q                      # [rows, k]; Q [cols, k] is a FIXED Gaussian, never updated
    P <- allreduce_mean(P)       # across the data-parallel group (same shard index, all machines)
    P <- householder_qr(P + eps I).Q   # App. E.2: Householder, not Gram-Schmidt; + eps I for stability
    Q' = M^T P                   # [cols, k]
    Q' <- allreduce_mean(Q')
    M_hat = P Q'^T               # the decompressed, averaged gradient (written to the output)
    error <- M - M_hat           # residual kept for the next step

All P's of a step go in ONE all-reduce, all Q's in a second, and the uncompressed tensors in a
third. Only the resblocks' weight matrices are compressed (what Table 1's rate 1 - 5r/(8 d_model)
describes); `uncompressed` names the rest (embeddings, head), sent dense.

Zeroing is minimal (§2.5): a non-finite gradient value is dropped where it is (that element only,
and the step is flagged so the trainer skips it), never the buffer; a non-finite buffer element
is reset alone. The buffers are saved in checkpoints and restored on resume.

`dtype="16bit"`: the error buffers are bf16 (fp32's exponent range: a gradient that does not
underflow in fp32 does not underflow there) and P, Q' go over the wire as fp16 scaled by a power
of two agreed across the group (the largest exponent on any rank, with headroom for the sum), so
small gradients keep their digits; Horovod has no bf16 collectives. `wire_bytes` counts what the
all-reduces carry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional

import torch

from dalle.errors import CheckpointError

AllReduce = Callable[[torch.Tensor, str], torch.Tensor]  # mean over the data-parallel group
AgreeMax = Callable[[int], int]  # max of an int over the data-parallel group
DTYPES = ("fp32", "16bit")


def compression_rate(d_model: int, rank: int) -> float:
    """Paper Table 1 / App. E.1: 1 - 5r/(8 d_model) for 8 shards per machine."""
    return 1.0 - 5.0 * rank / (8.0 * d_model)


def shard_rank(rank: int, shard_group_size: int) -> int:
    """App. E.1: each of the m shards of a matrix is compressed with rank r/m."""
    return max(1, rank // shard_group_size)


@dataclass(frozen=True)
class Plan:
    """How one named gradient goes over the wire."""

    shape: tuple[int, ...]
    rank: int  # 0: uncompressed

    @property
    def dense_numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def wire_numel(self) -> int:
        if not self.rank:
            return self.dense_numel
        rows, cols = self.shape
        return (rows + cols) * self.rank  # P [rows, k] + Q' [cols, k]


def make_plan(shape: tuple[int, ...], rank: int, min_dim: int) -> Plan:
    """Compress 2-D matrices whose smaller side is >= min_dim and for which it saves bytes."""
    if len(shape) != 2 or min(shape) < min_dim:
        return Plan(tuple(shape), 0)
    k = min(rank, min(shape))
    if (shape[0] + shape[1]) * k >= shape[0] * shape[1]:
        return Plan(tuple(shape), 0)
    return Plan(tuple(shape), k)


def orthogonalize(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Householder QR of P + eps*I (App. E.2), returning the orthonormal factor [rows, k]."""
    eye = torch.eye(p.shape[0], p.shape[1], dtype=p.dtype, device=p.device)
    return torch.linalg.qr(p + eps * eye, mode="reduced").Q


def scaled_fp16(t: torch.Tensor, allreduce: AllReduce, name: str, agree_max: AgreeMax,
                group: int) -> torch.Tensor:
    """Mean-all-reduce fp32 `t` as fp16: scaled by 2^s so the group's largest |value| sits at
    2^(14 - log2 group) (the sum of `group` of them stays below fp16's 65504), unscaled in fp32."""
    if t.device.type == "meta":
        return allreduce(t.half(), name).float()
    peak = float(t.abs().max()) if t.numel() else 0.0
    exp = math.frexp(peak)[1] if peak > 0 and math.isfinite(peak) else -1000
    top = agree_max(exp)
    if top <= -1000:
        return allreduce(t.half(), name).float()  # all zero everywhere
    shift = 14 - math.ceil(math.log2(max(group, 1))) - top
    return allreduce((t * 2.0 ** shift).half(), name).float() * 2.0 ** -shift


class PowerSGD:
    """Compress-allreduce-decompress a fixed set of named gradients, step after step."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], rank: int, min_dim: int = 16,
                 error_feedback: bool = True, seed: int = 0, eps: float = 1e-6,
                 device: torch.device | str = "cpu", dtype: str = "fp32",
                 uncompressed: Collection[str] = ()) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"PowerSGD dtype {dtype!r} is not one of {DTYPES}")
        self.plans = {name: make_plan(tuple(s), rank, min_dim) if name not in uncompressed
                      else Plan(tuple(s), 0) for name, s in shapes.items()}
        self.error_feedback, self.eps, self.dtype = error_feedback, eps, dtype
        self.device = torch.device(device)
        buf = torch.bfloat16 if dtype == "16bit" else torch.float32
        gen = torch.Generator().manual_seed(seed)  # shared seed: identical Q on every rank
        self.q: dict[str, torch.Tensor] = {}
        self.errors: dict[str, torch.Tensor] = {}
        for name in sorted(self.plans):
            plan = self.plans[name]
            if not plan.rank:
                continue
            q = torch.randn(plan.shape[1], plan.rank, generator=gen)  # [cols, k], never updated
            self.q[name] = q.to(self.device) if self.device.type != "meta" else q.to("meta")
            if error_feedback:
                self.errors[name] = torch.zeros(plan.shape, device=self.device, dtype=buf)
        self.zeroed = 0  # non-finite elements dropped or reset, all steps together
        self.accumulated: set[str] = set()  # buffers holding this step's gradient already

    # ------------------------------------------------------------------ accounting
    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "16bit" else 4

    def wire_bytes(self, itemsize: Optional[int] = None) -> int:
        """Bytes of the P/Q' all-reduces plus the dense one (the latter always fp32)."""
        comp = sum(p.wire_numel for p in self.plans.values() if p.rank)
        dense = sum(p.dense_numel for p in self.plans.values() if not p.rank)
        return (itemsize or self.itemsize) * comp + (itemsize or 4) * dense

    def dense_bytes(self, itemsize: int = 4) -> int:
        return itemsize * sum(p.dense_numel for p in self.plans.values())

    def measured_rate(self) -> float:
        return 1.0 - self.wire_bytes(4) / self.dense_bytes()

    # ------------------------------------------------------------------ accumulation
    def _drop_non_finite(self, t: torch.Tensor) -> bool:
        """Zero the non-finite elements of t in place (only those); True when there were any."""
        if t.device.type == "meta":
            return False
        bad = ~torch.isfinite(t)
        n = int(bad.sum())
        if n:
            t.masked_fill_(bad, 0.0)
            self.zeroed += n
        return bool(n)

    @torch.no_grad()
    def accumulate(self, name: str, grad: torch.Tensor, scale: float = 1.0) -> bool:
        """error[name] += grad / scale (grad in the block's gradient-scale units, any dtype),
        during backpropagation. Non-finite values are dropped (only them; the caller flags the
        step); returns False when there were any."""
        err = self.errors[name]
        g = grad.reshape(err.shape)
        finite = g.device.type == "meta" or bool(torch.isfinite(g).all())
        if not finite:
            g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
            self.zeroed += 1
        err.add_(g, alpha=1.0 / scale)  # computed in fp32, rounded once into the buffer's dtype
        self._drop_non_finite(err)  # a finite gradient can still overflow a buffer element
        self.accumulated.add(name)
        return finite

    def _matrix(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """M for this step: the error buffer holding the gradient (EF; its own dtype) or an fp32
        copy of the gradient."""
        if not self.error_feedback:
            m = grad.reshape(self.plans[name].shape).float().clone()
            self._drop_non_finite(m)
            return m
        if name not in self.accumulated:
            self.accumulate(name, grad)
        return self.errors[name]

    # ------------------------------------------------------------------ the step
    def _allreduce(self, t: torch.Tensor, allreduce: AllReduce, name: str,
                   agree_max: Optional[AgreeMax], group: int) -> torch.Tensor:
        if self.dtype == "fp32":
            return allreduce(t, name)
        return scaled_fp16(t, allreduce, name, agree_max or (lambda e: e), group)

    @torch.no_grad()
    def reduce(self, grads: Mapping[str, torch.Tensor], allreduce: AllReduce,
               agree_max: Optional[AgreeMax] = None, group: int = 1) -> None:
        """Replace every grads[name] (in place) by its data-parallel average, compressed where
        planned. A compressed name whose gradient was `accumulate`d during backprop reads its
        buffer (grads[name] is then only the output). `agree_max`/`group`: the data-parallel
        group's max of an int and its size, for the 16-bit wire's shared scale."""
        dense = [n for n in sorted(grads) if not self.plans[n].rank]
        comp = [n for n in sorted(grads) if self.plans[n].rank]
        if dense:
            flat = allreduce(torch.cat([grads[n].reshape(-1).float() for n in dense]), "psgd.dense")
            for name, part in zip(dense, flat.split([grads[n].numel() for n in dense])):
                grads[name].copy_(part.view_as(grads[name]))
        if comp:
            self._compress(comp, grads, allreduce, agree_max, group)
        self.accumulated.clear()

    def _compress(self, comp: list[str], grads: Mapping[str, torch.Tensor], allreduce: AllReduce,
                  agree_max: Optional[AgreeMax], group: int) -> None:
        ms = {n: self._matrix(n, grads[n]) for n in comp}  # [rows, cols] each (fp32 math below,
        ps = [ms[n].float() @ self.q[n] for n in comp]  # one matrix at a time); P: [rows, k] each
        p_all = self._allreduce(torch.cat([p.reshape(-1) for p in ps]), allreduce, "psgd.p", agree_max, group)
        ps = [orthogonalize(p.view(ps[i].shape), self.eps)
              for i, p in enumerate(p_all.split([p.numel() for p in ps]))]
        qs = [ms[n].float().T @ p for n, p in zip(comp, ps)]  # Q': [cols, k] each
        q_all = self._allreduce(torch.cat([q.reshape(-1) for q in qs]), allreduce, "psgd.q", agree_max, group)
        for i, (name, q) in enumerate(zip(comp, q_all.split([q.numel() for q in qs]))):
            approx = ps[i] @ q.view(qs[i].shape).T  # M_hat [rows, cols], fp32
            if self.error_feedback:  # the residual stays in the buffer (fp32 math, one rounding)
                m = ms[name]
                m.copy_(m.float().sub_(approx)) if m.dtype != torch.float32 else m.sub_(approx)
            grads[name].copy_(approx.view_as(grads[name]))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: buf.clone() for name, buf in self.errors.items()}

    def load_state_dict(self, state: Optional[Mapping[str, torch.Tensor]]) -> None:
        for name, buf in (state or {}).items():
            if name not in self.errors or self.errors[name].shape != tuple(buf.shape):
                raise CheckpointError(f"PowerSGD error buffer {name} {tuple(buf.shape)} does not "
                                      "match this model/sharding")
            self.errors[name].copy_(buf)
