"""PowerSGD (paper §2.5, App. E): compression rate from the bytes actually sent, exactness on
low-rank gradients, data-parallel averaging, error feedback, fixed Q, non-finite handling."""
from __future__ import annotations

import threading

import pytest
import torch

from dalle.distributed.powersgd import PowerSGD, compression_rate, make_plan, shard_rank
from dalle.distributed.sharding import shard_shapes
from dalle.distributed.toy import ToyBlock
from dalle.errors import CheckpointError


class Recorder:
    def __init__(self) -> None:
        self.bytes = 0
        self.calls: list[str] = []

    def __call__(self, t: torch.Tensor, name: str) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        self.calls.append(name)
        return t


class FusedBlock(torch.nn.Module):
    """The prior's layout: one fused qkv [3d, d], the output projection, the 4x MLP."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)


def paper_shard_shapes(d: int, fused: bool, m: int = 8) -> dict[str, tuple[int, ...]]:
    """The weight matrices of one resblock (q, k, v, o, MLP in/out) as sharded over m GPUs."""
    with torch.device("meta"):
        block = FusedBlock(d) if fused else ToyBlock(d, 1)
    return shard_shapes([(k, p.shape) for k, p in block.named_parameters() if p.ndim == 2], m)


@pytest.mark.parametrize("size,d,r,table1", [("2.8B", 1920, 512, 0.83), ("5.6B", 2688, 640, 0.85),
                                             ("12.0B", 3968, 896, 0.86)])
@pytest.mark.parametrize("fused", [False, True])
def test_measured_rate_matches_paper_table1(size: str, d: int, r: int, table1: float, fused: bool) -> None:
    shapes = paper_shard_shapes(d, fused)
    q, mlp_in, mlp_out = (("qkv.weight#0", "fc1.weight", "fc2.weight") if fused
                          else ("q.weight", "fc1.weight", "fc2.weight"))
    assert shapes[q] == (d // 8, d) and shapes[mlp_in] == (4 * d // 8, d)
    assert shapes[mlp_out] == (d, 4 * d // 8) and len(shapes) == 6
    psgd = PowerSGD(shapes, shard_rank(r, 8), min_dim=128, device="meta")
    grads = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    rec = Recorder()
    psgd.reduce(grads, rec)  # runs the real step on shapes only (no 12B allocation)
    dense = 4 * sum(s[0] * s[1] for s in shapes.values())
    measured = 1.0 - rec.bytes / dense
    assert rec.calls == ["psgd.p", "psgd.q"]
    assert measured == pytest.approx(compression_rate(d, r), abs=1e-12)
    assert round(measured, 2) == table1, size


def test_low_rank_gradient_is_recovered_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)  # rank 3 [40, 30]
    psgd = PowerSGD({"w": (40, 30)}, rank=3, min_dim=4, eps=0.0)
    grad = {"w": m.clone()}
    psgd.reduce(grad, Recorder())
    torch.testing.assert_close(grad["w"], m, atol=1e-4, rtol=1e-4)
    assert psgd.errors["w"].abs().max() < 1e-4


def run_workers(grads: list[dict[str, torch.Tensor]], **kw: object) -> list[PowerSGD]:
    """Run one reduce() per simulated data-parallel worker, in threads, with a mean all-reduce."""
    n = len(grads)
    comps = [PowerSGD({k: tuple(v.shape) for k, v in grads[0].items()}, **kw) for _ in range(n)]
    slots: dict[str, list[torch.Tensor]] = {}
    barrier = threading.Barrier(n)
    lock = threading.Lock()

    def allreduce(i: int):
        def fn(t: torch.Tensor, name: str) -> torch.Tensor:
            with lock:
                slots.setdefault(name, [None] * n)[i] = t.clone()
            barrier.wait()
            out = torch.stack(slots[name]).mean(0)
            barrier.wait()
            return out
        return fn

    threads = [threading.Thread(target=comps[i].reduce, args=(grads[i], allreduce(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return comps


def test_workers_agree_on_the_average_and_small_tensors_go_dense() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(32, 2, generator=g) @ torch.randn(2, 24, generator=g)
    grads = [{"w": base + 0.0, "b": torch.randn(24, generator=g), "tiny": torch.randn(3, 3, generator=g)}
             for _ in range(3)]
    originals = [{k: v.clone() for k, v in d.items()} for d in grads]
    grads[1]["w"] = base * 3  # mean of w: (1 + 3 + 1) / 3 * base: still rank 2
    comps = run_workers(grads, rank=2, min_dim=4, eps=0.0)
    assert comps[0].plans["b"].rank == 0 and comps[0].plans["tiny"].rank == 0
    torch.testing.assert_close(grads[0]["w"], base * 5 / 3, atol=1e-4, rtol=1e-4)
    for k in ("w", "b", "tiny"):
        torch.testing.assert_close(grads[0][k], grads[2][k])  # every worker gets the same result
    torch.testing.assert_close(grads[0]["b"], torch.stack([o["b"] for o in originals]).mean(0))


def test_error_feedback_telescopes_and_q_stays_fixed() -> None:
    g = torch.Generator().manual_seed(3)
    psgd = PowerSGD({"w": (48, 40)}, rank=2, min_dim=4)
    q0 = psgd.q["w"].clone()
    sent, total = torch.zeros(48, 40), torch.zeros(48, 40)
    for _ in range(5):
        grad = {"w": torch.randn(48, 40, generator=g)}
        total += grad["w"]
        psgd.reduce(grad, Recorder())
        sent += grad["w"]
    torch.testing.assert_close(sent + psgd.errors["w"], total, atol=1e-4, rtol=1e-4)
    assert torch.equal(psgd.q["w"], q0)  # never updated (App. E.2: no warm start)
    assert torch.equal(PowerSGD({"w": (48, 40)}, rank=2, min_dim=4).q["w"], q0)  # shared seed


def test_without_error_feedback_nothing_is_kept() -> None:
    psgd = PowerSGD({"w": (48, 40)}, rank=2, min_dim=4, error_feedback=False)
    assert psgd.errors == {} and psgd.state_dict() == {}


def test_non_finite_values_zero_the_buffer_only_then() -> None:
    psgd = PowerSGD({"w": (20, 16)}, rank=2, min_dim=4)
    psgd.reduce({"w": torch.randn(20, 16)}, Recorder())
    kept = psgd.errors["w"].clone()
    assert kept.abs().sum() > 0
    bad = torch.randn(20, 16)
    bad[3, 4] = float("inf")
    grad = {"w": bad}
    psgd.reduce(grad, Recorder())
    assert psgd.zeroed == 1 and torch.isfinite(grad["w"]).all() and torch.isfinite(psgd.errors["w"]).all()


def test_state_round_trip_and_mismatch() -> None:
    a = PowerSGD({"w": (20, 16)}, rank=2, min_dim=4)
    a.reduce({"w": torch.randn(20, 16)}, Recorder())
    b = PowerSGD({"w": (20, 16)}, rank=2, min_dim=4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.errors["w"], b.errors["w"])
    with pytest.raises(CheckpointError, match="error buffer w"):
        PowerSGD({"w": (20, 8)}, rank=2, min_dim=4).load_state_dict(a.state_dict())


def test_plans_and_formula() -> None:
    assert make_plan((64,), 4, 16).rank == 0
    assert make_plan((8, 300), 4, 16).rank == 0  # smaller side below min_dim
    assert make_plan((20, 20), 16, 4).rank == 0  # would not save bytes
    assert make_plan((64, 64), 4, 16).wire_numel == 128 * 4
    assert compression_rate(3968, 896) == pytest.approx(1 - 5 * 896 / (8 * 3968))
    assert shard_rank(896, 8) == 112 and shard_rank(4, 8) == 1
