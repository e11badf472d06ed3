"""Per-rank training checkpoints of a sharded run (safe to kill and rerun).

Each rank writes `rank{r}.step{s}.safetensors` with `dalle.io.save_checkpoint` (atomic): its
parameter slices, their Adam state and the strategy's state (EMA slices, PowerSGD error buffers -
paper App. E.2: the buffers survive restarts), and keeps the last two. A restart resumes from the
newest step that EVERY rank has written (a kill can land between two ranks' writes), and refuses,
in one line, a checkpoint written with another topology.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from dalle.distributed.strategy import ShardedStrategy
from dalle.io import CONFIG_KEY, check_config, load_checkpoint, save_checkpoint
from dalle.train.common import rng_state, set_rng_state


def _step_of(path: Path) -> int:
    m = re.search(r"step(\d+)\.safetensors$", path.name)
    return int(m.group(1)) if m else -1


def _mine(ckpt_dir: Path, rank: int) -> list[Path]:
    return sorted(ckpt_dir.glob(f"rank{rank}.step*.safetensors"), key=_step_of)


def topology(strategy: ShardedStrategy) -> dict[str, int]:
    return {"world": strategy.size, "shard_group": strategy.shard_comm.size}


def _check_topology(ckpt_dir: Path, expected: dict[str, Any]) -> None:
    """Any rank's checkpoint of another world/shard size is an error, not a silent fresh start
    (ranks that did not exist before would otherwise find nothing and drag the step to 0)."""
    found = sorted(ckpt_dir.glob("rank*.step*.safetensors"), key=_step_of)
    if not found:
        return
    try:
        with safe_open(str(found[-1]), framework="pt") as fh:
            config = json.loads((fh.metadata() or {})[CONFIG_KEY])
    except (OSError, ValueError, KeyError, RuntimeError):
        return  # unreadable: load_checkpoint below reports it in one line
    check_config(found[-1], config, expected)


def save_rank(ckpt_dir: Path, strategy: ShardedStrategy, opt: torch.optim.Optimizer, step: int,
              extra: Optional[dict[str, Any]] = None, config: Optional[dict[str, Any]] = None) -> Path:
    """This rank's slices + optimiser + strategy state at `step` (every rank calls it)."""
    params = strategy.parameters()
    tensors = {f"shard.{i}": p.detach() for i, p in enumerate(params)}
    adam = [dict(opt.state[p]) for p in params]
    state = {"step": step, "adam": adam, "strategy": strategy.state_dict(), "extra": extra or {}}
    path = save_checkpoint(ckpt_dir / f"rank{strategy.rank}.step{step}.safetensors", tensors,
                           {**(config or {}), **topology(strategy)}, state)
    for old in _mine(ckpt_dir, strategy.rank)[:-2]:  # keep two: see resume_rank
        old.unlink(missing_ok=True)
    return path


def resume_rank(ckpt_dir: Path, strategy: ShardedStrategy, opt: torch.optim.Optimizer,
                config: Optional[dict[str, Any]] = None) -> tuple[int, dict[str, Any]]:
    """(step, extra) of the newest checkpoint every rank has; (0, {}) when there is none.
    `config` (e.g. the model's) must match the one saved, as must the topology."""
    expected = {**(config or {}), **topology(strategy)}
    _check_topology(ckpt_dir, expected)
    latest = max((_step_of(p) for p in _mine(ckpt_dir, strategy.rank)), default=0)
    step = strategy.agree_min(latest)
    if not step:
        return 0, {}
    weights, _, state = load_checkpoint(ckpt_dir / f"rank{strategy.rank}.step{step}.safetensors",
                                        expected_config=expected, with_state=True)
    for i, p in enumerate(strategy.parameters()):
        p.data.copy_(weights[f"shard.{i}"])
        opt.state[p] = dict(state["adam"][i])
    strategy.load_state_dict(state["strategy"])
    return int(state["step"]), dict(state.get("extra") or {})


class RankStore:
    """The training loop's state store for a sharded run (dalle.train.loop.StateStore): every rank
    saves and resumes its own slices, Adam state, strategy state, RNG and the trainer's extra."""

    def __init__(self, ckpt_dir: Path, config: dict[str, Any]) -> None:
        self.ckpt_dir, self.config = Path(ckpt_dir), config

    def load(self, loop: Any) -> int:
        step, extra = resume_rank(self.ckpt_dir, loop.strategy, loop.optimizer, self.config)
        if step:
            set_rng_state(extra["rng"])
            loop.load_extra(extra["extra"])
        return step

    def save(self, loop: Any) -> None:
        save_rank(self.ckpt_dir, loop.strategy, loop.optimizer, loop.step,
                  {"rng": rng_state(), "extra": loop.extra_state()}, self.config)

    def remove(self) -> None:
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
