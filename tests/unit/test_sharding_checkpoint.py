"""Per-rank checkpoints (dalle.distributed.checkpoint): exact resume in one process, only the
last two kept, a checkpoint of another topology refused in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dalle.distributed.checkpoint import resume_rank, save_rank
from dalle.distributed.sharding import LocalComm
from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.toy import ToyConfig, ToyModel, train_toy
from dalle.errors import CheckpointError
from tests.helpers import section

CFG = ToyConfig(n_layers=1, d_model=16, seq_len=8)


def test_kill_and_rerun_continues_exactly(tmp_path: Path) -> None:
    straight = train_toy(CFG, ShardedStrategy(section("distributed")), 6)
    first = train_toy(CFG, ShardedStrategy(section("distributed")), 6, tmp_path, ckpt_every=1, stop_after=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.step3.safetensors",
                                                         "rank0.step4.safetensors"]
    second = train_toy(CFG, ShardedStrategy(section("distributed")), 6, tmp_path, ckpt_every=1)
    assert first["step"] == [1, 2, 3, 4] and second["step"] == [5, 6]
    assert second["loss"] == pytest.approx(straight["loss"][4:], abs=1e-6)


class TwoRanks(LocalComm):
    size, rank = 2, 0


def test_other_topology_is_refused_in_one_line(tmp_path: Path) -> None:
    strategy = ShardedStrategy(section("distributed"))
    strategy.wrap(ToyModel(CFG))
    opt = torch.optim.Adam(strategy.parameters())
    save_rank(tmp_path, strategy, opt, 2, extra={"note": "x"})
    assert resume_rank(tmp_path, strategy, opt) == (2, {"note": "x"})
    other = ShardedStrategy(section("distributed"))
    other.shard_comm = TwoRanks()  # as if launched with shard_group_size 2
    other.wrap(ToyModel(CFG))
    with pytest.raises(CheckpointError) as exc:
        resume_rank(tmp_path, other, torch.optim.Adam(other.parameters()))
    assert "shard_group is 1 in the checkpoint but 2 in params" in exc.value.one_line()


def test_more_ranks_than_before_is_refused_not_a_fresh_start(tmp_path: Path) -> None:
    strategy = ShardedStrategy(section("distributed"))
    strategy.wrap(ToyModel(CFG))
    save_rank(tmp_path, strategy, torch.optim.Adam(strategy.parameters()), 2)
    (tmp_path / "rank0.step2.safetensors").rename(tmp_path / "rank1.step2.safetensors")
    # rank 0 of a new world finds no file of its own, but rank 1's says world 1
    with pytest.raises(CheckpointError, match="shard_group is 1 in the checkpoint but 2"):
        other = ShardedStrategy(section("distributed"))
        other.shard_comm = TwoRanks()
        other.wrap(ToyModel(CFG))
        resume_rank(tmp_path, other, torch.optim.Adam(other.parameters()))
