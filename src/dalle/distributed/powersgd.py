"""PowerSGD gradient compression across machines (paper §2.5, App. E; Vogels et al. 2019).

Each rank's shard gradient matrix M [rows, cols] (with error feedback: the gradient is accumulated
INTO the error buffer, which then serves as M, saving a buffer - App. E.2) is compressed to rank k:

    P = M Q                      # [rows, k]; Q [cols, k] is a FIXED Gaussian, never updated
    P <- allreduce_mean(P)       # across the data-parallel group (same shard index, all machines)
    P <- householder_qr(P + eps I).Q   # App. E.2: Householder, not Gram-Schmidt; + eps I for stability
    Q' = M^T P                   # [cols, k]
    Q' <- allreduce_mean(Q')
    M_hat = P Q'^T               # the decompressed, averaged gradient
    error <- M - M_hat           # residual kept for the next step (zeroed only on non-finite values)

All P's of a step go in ONE all-reduce, all Q's in a second, and the uncompressed tensors (1-D
parameters, small matrices) in a third. `wire_bytes` counts what those all-reduces carry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from dalle.errors import CheckpointError

AllReduce = Callable[[torch.Tensor, str], torch.Tensor]  # mean over the data-parallel group


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


class PowerSGD:
    """Compress-allreduce-decompress a fixed set of named gradients in place, step after step."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], rank: int, min_dim: int = 16,
                 error_feedback: bool = True, seed: int = 0, eps: float = 1e-6,
                 device: torch.device | str = "cpu") -> None:
        self.plans = {name: make_plan(tuple(s), rank, min_dim) for name, s in shapes.items()}
        self.error_feedback = error_feedback
        self.eps = eps
        self.device = torch.device(device)
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
                self.errors[name] = torch.zeros(plan.shape, device=self.device)
        self.zeroed = 0  # how many times a non-finite buffer was reset

    # ------------------------------------------------------------------ accounting
    def wire_bytes(self, itemsize: int = 4) -> int:
        return itemsize * sum(p.wire_numel for p in self.plans.values())

    def dense_bytes(self, itemsize: int = 4) -> int:
        return itemsize * sum(p.dense_numel for p in self.plans.values())

    def measured_rate(self) -> float:
        return 1.0 - self.wire_bytes() / self.dense_bytes()

    # ------------------------------------------------------------------ the step
    def _matrix(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """M for this step: grad accumulated into the error buffer (EF) or the grad itself."""
        if not self.error_feedback:
            return grad.reshape(self.plans[name].shape).clone()
        err = self.errors[name]
        err.add_(grad.reshape(err.shape))
        if err.device.type != "meta" and not bool(torch.isfinite(err).all()):
            err.zero_()  # App. E.2: buffers are zeroed only when they hold non-finite values
            self.zeroed += 1
        return err

    @torch.no_grad()
    def reduce(self, grads: Mapping[str, torch.Tensor], allreduce: AllReduce) -> None:
        """Replace every grads[name] (in place) by its data-parallel average (compressed)."""
        dense = [n for n in sorted(grads) if not self.plans[n].rank]
        comp = [n for n in sorted(grads) if self.plans[n].rank]
        if dense:
            flat = allreduce(torch.cat([grads[n].reshape(-1) for n in dense]), "psgd.dense")
            for name, part in zip(dense, flat.split([grads[n].numel() for n in dense])):
                grads[name].copy_(part.view_as(grads[name]))
        if not comp:
            return
        ms = {n: self._matrix(n, grads[n]) for n in comp}
        ps = [ms[n] @ self.q[n] for n in comp]  # [rows, k] each
        p_all = allreduce(torch.cat([p.reshape(-1) for p in ps]), "psgd.p")
        ps = [orthogonalize(p.view(ps[i].shape), self.eps)
              for i, p in enumerate(p_all.split([p.numel() for p in ps]))]
        qs = [ms[n].T @ p for n, p in zip(comp, ps)]  # [cols, k] each
        q_all = allreduce(torch.cat([q.reshape(-1) for q in qs]), "psgd.q")
        for i, (name, q) in enumerate(zip(comp, q_all.split([q.numel() for q in qs]))):
            approx = ps[i] @ q.view(qs[i].shape).T  # [rows, cols]
            if self.error_feedback:
                ms[name].sub_(approx)  # the residual stays in the buffer
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
