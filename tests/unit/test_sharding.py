"""Parameter sharding (paper fig. 5): slicing rules, lossless split/merge, pack/unpack for the
collectives, 1/n memory, and a sharded model that computes exactly what the plain one does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle.distributed.sharding import (FlatShard, LocalComm, Prefetcher, make_slots, merge_slices,
                                        shard_axis, shard_blocks, split_full)
from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.toy import ToyBlock, ToyConfig, ToyModel, toy_batch, train_toy
from tests.helpers import section


class FakeComm(LocalComm):
    """A group of `size` seen from `rank`, for layout tests (no collectives are called)."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank


def test_matrices_keep_d_model_and_slice_the_other_axis() -> None:
    d = 64
    assert shard_axis((d, d), 8) == 0
    assert shard_axis((4 * d, d), 8) == 0  # MLP in: 4d/m x d (App. E.1)
    assert shard_axis((d, 4 * d), 8) == 1  # MLP out: d x 4d/m
    assert shard_axis((d,), 8) is None
    assert shard_axis((6, 5), 4) is None  # neither axis divisible: flat with padding


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (7,), (6, 5), (5, 16), (1, 1)])
def test_split_merge_round_trip(n: int, shape: tuple[int, ...]) -> None:
    full = torch.randn(shape)
    (slot,) = make_slots([("w", full.shape)], n)
    parts = split_full(full, slot, n)
    assert len(parts) == n and all(p.numel() == slot.shard_numel for p in parts)
    assert torch.equal(merge_slices(parts, slot), full)


@pytest.mark.parametrize("n", [2, 4])
def test_pack_is_rank_major_and_unpack_inverts_it(n: int) -> None:
    block = ToyBlock(16, 2)
    named = list(block.named_parameters())
    shards = [FlatShard(named, FakeComm(n, r)) for r in range(n)]
    packed = shards[0].pack({k: v.detach() for k, v in named})  # [n * L]
    per_rank = packed.view(n, shards[0].numel)
    for r in range(n):
        assert torch.equal(per_rank[r], shards[r].flat())
    full = shards[0].unpack(packed)
    for k, v in named:
        assert torch.equal(full[k], v.detach())


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_parameter_and_adam_memory_fall_as_one_over_n(n: int) -> None:
    block = ToyBlock(64, 4)
    total = sum(p.numel() for p in block.parameters())
    shard = FlatShard(list(block.named_parameters()), FakeComm(n, 0))
    opt = torch.optim.Adam(shard.params, lr=1e-3)
    shard.grad_pieces()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for p in shard.params for t in opt.state[p].values()
                      if t.ndim)
    param_bytes = sum(p.numel() * 4 for p in shard.params)
    assert param_bytes + state_bytes == pytest.approx(3 * 4 * total / n, rel=0.01)


def test_sharded_block_matches_the_plain_block_forward_and_backward() -> None:
    torch.manual_seed(0)
    plain = torch.nn.ModuleList([ToyBlock(32, 4), ToyBlock(32, 4)])
    ref = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    x = torch.randn(3, 5, 32, requires_grad=True)
    y_ref = plain[1](plain[0](x))
    y_ref.square().sum().backward()
    g_ref = {k: p.grad.clone() for k, p in plain.named_parameters()}
    gx_ref = x.grad.clone()
    x.grad = None
    blocks = torch.nn.ModuleList([ToyBlock(32, 4), ToyBlock(32, 4)])
    blocks.load_state_dict(ref)
    pre = shard_blocks(blocks, LocalComm())
    y = blocks[1](blocks[0](x))
    assert not pre.pending  # nothing prefetched beyond the last block
    y.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, gx_ref)
    for i, sb in enumerate(blocks):
        grads = sb.shard.views(sb.shard.grad_pieces())
        for k, g in grads.items():
            torch.testing.assert_close(g, g_ref[f"{i}.{k}"])
    assert pre.gathers == 4  # each block gathered once forward, once backward
    assert all(p.numel() == 0 for b in blocks for p in b.inner.parameters())  # full copies dropped


def test_sharded_training_equals_plain_training_in_one_process() -> None:
    cfg = ToyConfig(n_layers=2, d_model=32)
    model = ToyModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ref = []
    for step in range(3):
        t = toy_batch(cfg, step)
        loss = F.cross_entropy(model(t[:, :-1]).reshape(-1, cfg.vocab), t[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    strategy = ShardedStrategy(section("distributed"))
    out = train_toy(cfg, strategy, 3)
    assert out["loss"] == pytest.approx(ref, abs=1e-6)


def test_full_state_dict_has_the_unsharded_names_and_values() -> None:
    cfg = ToyConfig(n_layers=2, d_model=32)
    model = ToyModel(cfg)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = ShardedStrategy(section("distributed"))
    strategy.wrap(model)
    assert isinstance(strategy.prefetcher, Prefetcher)
    full = strategy.full_state_dict(model)
    assert set(full) == set(expected)
    for k, v in expected.items():
        assert torch.equal(full[k], v), k


def test_ema_lives_on_the_slices_and_gathers_to_full_weights() -> None:
    cfg = ToyConfig(n_layers=1, d_model=16)
    model = ToyModel(cfg)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = ShardedStrategy(section("distributed"))
    strategy.wrap(model)
    strategy.ema_update(0.5)  # first call copies
    with torch.no_grad():
        for p in strategy.parameters():
            p.add_(2.0)
    strategy.ema_update(0.5)  # -> weights + 1
    assert [e.shape for e in strategy.ema] == [p.shape for p in strategy.parameters()]
    ema = strategy.full_state_dict(model, ema=True)
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v + 1.0)
    state = strategy.state_dict()
    other = ShardedStrategy(section("distributed"))
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.ema, strategy.ema))


class MaskedBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("bias_buf", torch.ones(8))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.lin(x) * mask + self.bias_buf


def test_extra_arguments_and_buffers_pass_through() -> None:
    plain = torch.nn.ModuleList([MaskedBlock()])
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randn(2, 8, requires_grad=True)
    mask = (torch.arange(8) % 2).float()
    plain[0](x, mask, scale=0.5).sum().backward()
    ref_gx, ref_gw = x.grad.clone(), plain[0].lin.weight.grad.clone()
    x.grad = None
    sharded = torch.nn.ModuleList([MaskedBlock()])
    sharded.load_state_dict(state)
    shard_blocks(sharded, LocalComm())
    y = sharded[0](x, mask, scale=0.5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, ref_gx)
    torch.testing.assert_close(sharded[0].shard.views(sharded[0].shard.grad_pieces())["lin.weight"], ref_gw)


class LoggingComm(LocalComm):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def allgather_async(self, tensor: torch.Tensor, name: str) -> object:
        self.log.append(f"issue {name}")
        return (name, tensor)

    def wait(self, handle: object) -> torch.Tensor:
        name, tensor = handle  # type: ignore[misc]
        self.log.append(f"wait {name}")
        return tensor

    def reducescatter_mean(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        self.log.append(name)
        return tensor


class LoggedBlock(torch.nn.Module):
    def __init__(self, log: list[str], i: int) -> None:
        super().__init__()
        self.lin, self.log, self.i = torch.nn.Linear(4, 4), log, i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(f"compute {self.i}")
        return x + self.lin(x)


def test_next_block_is_gathered_while_the_current_one_computes() -> None:
    log: list[str] = []
    blocks = torch.nn.ModuleList([LoggedBlock(log, i) for i in range(3)])
    shard_blocks(blocks, LoggingComm(log))
    x = torch.randn(2, 4, requires_grad=True)
    y = x
    for b in blocks:
        y = b(y)
    # block i+1's gather is in flight before block i even waits for its own
    assert log == ["issue ag.0", "issue ag.1", "wait ag.0", "compute 0",
                   "issue ag.2", "wait ag.1", "compute 1", "wait ag.2", "compute 2"]
    log.clear()
    y.sum().backward()
    # backward: re-gather (prefetching block i-1), recompute, reduce-scatter the gradients
    assert log == ["issue ag.2", "issue ag.1", "wait ag.2", "compute 2", "rs.2",
                   "issue ag.0", "wait ag.1", "compute 1", "rs.1", "wait ag.0", "compute 0", "rs.0"]


class Fused(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_fused_qkv_is_three_matrices_and_round_trips(n: int) -> None:
    block = Fused(8)
    named = list(block.named_parameters())
    shards = [FlatShard(named, FakeComm(n, r)) for r in range(n)]
    assert [s.name for s in shards[0].slots] == ["qkv.weight#0", "qkv.weight#1", "qkv.weight#2", "qkv.bias"]
    assert shards[0].slots[0].shard_shape == (8 // n, 8)  # each of q, k, v sliced on its own
    packed = shards[0].pack({k: v.detach() for k, v in named})
    for r in range(n):
        assert torch.equal(packed.view(n, -1)[r], shards[r].flat())
    full = shards[0].unpack(packed)
    assert torch.equal(full["qkv.weight"], block.qkv.weight.detach())
    # rank r's q slice holds rows [r*8/n, (r+1)*8/n) of q (the first third of qkv)
    q_rows = block.qkv.weight.detach()[:8].chunk(n)[n - 1]
    assert torch.equal(shards[n - 1].views(shards[n - 1].flat())["qkv.weight#0"], q_rows)
