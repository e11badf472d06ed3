"""PowerSGD as §2.5 lists it, through the real sharded strategy in one process (a data-parallel
group whose other machine holds the same gradients): the gradient accumulated into the error
buffers during backprop (memory measured), minimal zeroing, buffers kept across resume, the
16-bit option without underflow, and compression of exactly Table 1's matrices."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dalle.distributed.powersgd import PowerSGD, compression_rate, shard_rank
from dalle.distributed.sharding import LocalComm
from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.toy import ToyConfig, train_toy
from dalle.models.transformer import DalleTransformer
from dalle.train.prior_loop import prior_loss
from tests.helpers import prior_config, section


class Mirror:
    """A data-parallel group of two machines with identical gradients: the mean is the input."""

    size, rank = 2, 0

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def allreduce_mean(self, t: torch.Tensor, name: str) -> torch.Tensor:
        self.dtypes.append(t.dtype)
        return t.clone()

    def allreduce_min(self, value: int, name: str) -> int:
        return value


class Eight(LocalComm):
    size, rank = 8, 0  # rank 0 of a machine of 8 (layout only: no collective is called)


def strategy(dtype: str = "fp32", rank: int = 4, ef: bool = True, shard: Any = None) -> ShardedStrategy:
    ps = section("distributed").powersgd.model_copy(update=dict(enabled=True, rank=rank, dtype=dtype,
                                                                error_feedback=ef, min_compression_dim=8))
    cfg = section("distributed").model_copy(update=dict(powersgd=ps))
    return ShardedStrategy(cfg, SimpleNamespace(world=None, shard=shard, data=Mirror()), seed=0)


def prior_step(s: ShardedStrategy, model: DalleTransformer, step: int = 0) -> None:
    g = torch.Generator().manual_seed(step)
    text, image = torch.randint(0, 40, (4, 6), generator=g), torch.randint(0, 24, (4, 16), generator=g)
    s.before_forward()
    prior_loss(model, text, torch.full((4,), 5), image)[0].backward()


def wrapped(s: ShardedStrategy) -> DalleTransformer:
    torch.manual_seed(0)
    model = DalleTransformer(prior_config(n_layers=2))
    s.wrap(model)
    return model


def test_the_gradient_is_accumulated_into_the_error_buffers_during_backprop() -> None:
    new, old = strategy(), strategy()
    m_new, m_old = wrapped(new), wrapped(old)
    for sh in old.shards:
        sh.sink = None  # the way it was: .grad first, added to the buffers after backward
    prior_step(new, m_new), prior_step(old, m_old)
    block_pieces = [p for sh in new.shards[:-1] for p in sh.params]
    assert all(p.grad is None for p in block_pieces)  # nothing allocated beside the buffers
    comp = [n for n, plan in new.psgd.plans.items() if plan.rank]
    old_grads = {f"{i}.{k}": v for i, sh in enumerate(old.shards) for k, v in sh.views(sh.grad_pieces()).items()}
    for name in comp:
        torch.testing.assert_close(new.psgd.errors[name], old_grads[name])  # the buffer holds the gradient
    # gradient storage alive when backprop ends (what adds to the activations' peak)
    held_old = sum(g.numel() * 4 for g in old.grads()) + sum(e.numel() * 4 for e in old.psgd.errors.values())
    held_new = sum(e.numel() * 4 for e in new.psgd.errors.values()) + sum(
        v.numel() * 4 for v in new.dense.values()) + sum(p.numel() * 4 for p in new.shards[-1].params)
    saved = sum(new.psgd.plans[n].dense_numel for n in comp) * 4
    assert held_old - held_new == saved and saved > 0.8 * sum(p.numel() * 4 for p in block_pieces)
    new.after_backward(), old.after_backward()
    for a, b in zip(new.grads(), old.grads()):  # the same decompressed average either way
        torch.testing.assert_close(a, b)
    for name in comp:
        torch.testing.assert_close(new.psgd.errors[name], old.psgd.errors[name])


def test_a_non_finite_value_drops_only_itself_not_the_buffer() -> None:
    psgd = PowerSGD({"w": (20, 16)}, rank=2, min_dim=4)
    psgd.reduce({"w": torch.randn(20, 16)}, Mirror().allreduce_mean)
    kept = psgd.errors["w"].clone()
    bad = torch.zeros(20, 16)
    bad[3, 4] = float("inf")
    assert not psgd.accumulate("w", bad)  # flagged: the trainer skips the step
    torch.testing.assert_close(psgd.errors["w"], kept)  # every residual kept, [3, 4] included
    assert kept.abs().sum() > 0 and psgd.zeroed == 1


def test_the_strategy_skips_a_step_with_an_overflow_and_keeps_the_buffers() -> None:
    s = strategy()
    model = wrapped(s)
    prior_step(s, model, 0)
    s.after_backward()
    before = {k: v.clone() for k, v in s.psgd.errors.items()}
    def overflow(_m: Any, _i: Any, out: torch.Tensor) -> None:
        if out.requires_grad:  # in the backward's recompute
            out.register_hook(lambda g: g * float("inf"))

    hook = model.blocks[1].inner.mlp.register_forward_hook(overflow)
    prior_step(s, model, 1)
    hook.remove()
    s.after_backward()
    assert s.clip_grad_norm_(1.0) == float("inf")  # the loop skips the step
    for name, buf in s.psgd.errors.items():
        assert torch.isfinite(buf).all(), name
        if name.startswith("0."):  # block 0 saw finite gradients: its buffer moved on, not zeroed
            assert not torch.equal(buf, before[name]) and buf.abs().sum() > 0


@pytest.mark.parametrize("dtype", ["fp32", "16bit"])
def test_error_buffers_are_saved_and_restored_on_resume(tmp_path: Path, dtype: str) -> None:
    cfg = ToyConfig(n_layers=1, d_model=16, seq_len=8)
    straight = train_toy(cfg, strategy(dtype), 6)
    first = strategy(dtype)
    train_toy(cfg, first, 6, tmp_path, ckpt_every=2, stop_after=4)
    assert any(e.abs().sum() > 0 for e in first.psgd.errors.values())
    again = strategy(dtype)
    second = train_toy(cfg, again, 6, tmp_path, ckpt_every=2)
    assert second["step"] == [5, 6]
    assert second["loss"] == pytest.approx(straight["loss"][4:], abs=1e-6)
    assert all(e.dtype == (torch.bfloat16 if dtype == "16bit" else torch.float32)
               for e in again.psgd.errors.values())


def test_16_bit_buffers_and_wire_do_not_underflow_on_small_gradients() -> None:
    """Gradients of ~1e-9 (fp16's smallest subnormal is 6e-8): the 16-bit option carries them."""
    g = torch.Generator().manual_seed(1)
    grad = (torch.randn(48, 3, generator=g) @ torch.randn(3, 40, generator=g)) * 1e-9  # rank 3
    assert grad.half().eq(0).float().mean() > 0.5  # a plain fp16 copy loses most of it
    out = {}
    for dtype in ("fp32", "16bit"):
        psgd, wire = PowerSGD({"w": (48, 40)}, rank=3, min_dim=4, eps=0.0, dtype=dtype), Mirror()
        out[dtype] = {"w": grad.clone()}
        psgd.reduce(out[dtype], wire.allreduce_mean, lambda e: e, group=128)
        assert wire.dtypes == ([torch.float32] * 2 if dtype == "fp32" else [torch.float16] * 2)
        assert psgd.errors["w"].dtype == (torch.bfloat16 if dtype == "16bit" else torch.float32)
    scale = float(grad.abs().max())  # 1.2e-8; the bf16 buffer rounds M to 8 bits (measured: 1.4%)
    assert float((out["fp32"]["w"] - grad).abs().max()) < 1e-5 * scale  # rank 3: recovered
    assert float((out["16bit"]["w"] - grad).abs().max()) < 3e-2 * scale


def test_only_the_resblock_matrices_of_table_1_are_compressed() -> None:
    """The prior at the paper's width (d_model 3968, 62 heads, one block, on the meta device),
    sharded over a machine of 8 with rank 896: the compressed set is exactly q, k, v, o and the
    two MLP matrices of the block, and their wire rate is Table 1's 1 - 5r/(8 d) = 86%."""
    s = strategy(rank=896, shard=Eight())
    with torch.device("meta"):
        model = DalleTransformer(prior_config(text_vocab=16384, text_len=256, image_vocab=8192, grid=32,
                                              n_layers=1, d_model=3968, n_heads=62, conv_kernel=11))
    s.wrap(model)
    comp = sorted(n for n, p in s.psgd.plans.items() if p.rank)
    assert comp == sorted(f"0.{k}" for k in ("attn.qkv.weight#0", "attn.qkv.weight#1", "attn.qkv.weight#2",
                                             "attn.proj.weight", "mlp.0.weight", "mlp.2.weight"))
    assert all(s.psgd.plans[n].rank == shard_rank(896, 8) == 112 for n in comp)
    wire = sum(s.psgd.plans[n].wire_numel for n in comp)
    dense = sum(s.psgd.plans[n].dense_numel for n in comp)
    assert 1 - wire / dense == pytest.approx(compression_rate(3968, 896), abs=1e-12)
    assert round(1 - wire / dense, 2) == 0.86
    # all 64 blocks plus the embeddings, head, gains and biases (sent dense): what goes on the wire
    per_block = [p for n, p in s.psgd.plans.items() if n.startswith("0.")]
    rest = [p for n, p in s.psgd.plans.items() if not n.startswith("0.")]
    sent = 64 * sum(p.wire_numel for p in per_block) + sum(p.dense_numel for p in rest)
    total = 64 * sum(p.dense_numel for p in per_block) + sum(p.dense_numel for p in rest)
    assert 0.84 < 1 - sent / total < 1 - wire / dense, 1 - sent / total
