"""A truncated checkpoint: the loader's one-line error, and on resume the previous good
training-state checkpoint (`<ckpt>.prev`, kept by `dalle.io.save_checkpoint`) is used, so the
run still ends equal to an uninterrupted one."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dalle.errors import CheckpointError
from dalle.io import load_checkpoint, previous_path, remove_checkpoint, save_checkpoint
from tests.reliability import killer
from tests.reliability.compare import diff_trees, leftovers
from tests.reliability.conftest import from_world


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_checkpoint_is_one_line_and_prev_is_used(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    ckpt = tmp_path / "state.safetensors"
    for step in (1, 2):
        save_checkpoint(ckpt, {"w": torch.full((4,), float(step))}, {"n": 4}, state={"step": step})
    _, _, prev_state = load_checkpoint(previous_path(ckpt), {"n": 4}, with_state=True)
    assert prev_state["step"] == 1
    _truncate(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)  # a weights file has no fallback
    assert "truncated" in err.value.one_line() and "\n" not in err.value.one_line()
    with caplog.at_level(logging.WARNING, logger="dalle.io"):
        weights, _, state = load_checkpoint(ckpt, {"n": 4}, with_state=True)
    assert state["step"] == 1 and torch.equal(weights["w"], torch.ones(4))
    assert "resuming from the previous checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="different config: n"):  # a mismatch never falls back
        save_checkpoint(ckpt, {"w": torch.zeros(4)}, {"n": 4}, state={"step": 3})
        load_checkpoint(ckpt, {"n": 5}, with_state=True)
    remove_checkpoint(ckpt)
    assert not ckpt.exists() and not previous_path(ckpt).exists()


@pytest.mark.parametrize("module,state_file,outputs", [
    ("stages.train_dvae", "dvae_train_state.safetensors", ["models", "metrics"]),
    ("stages.train_prior", "prior.ckpt.safetensors", ["models", "metrics", "plots"]),
])
def test_stage_resumes_from_previous_after_truncation(world: Path, tmp_path: Path, module: str,
                                                      state_file: str, outputs: list[str]) -> None:
    make_root = from_world(world, module.split(".")[-1], {"tokenizer.bpe_dropout": 0.0})
    base = make_root(tmp_path / "base")
    first = killer.run(module, ["--params", str(base / "params.yaml")], tmp_path / "base_work")
    assert first.exitcode == 0, first.stderr[-2000:]
    commits = [i for i, e in enumerate(first.log, 1) if e == f"commit {state_file}"]
    assert len(commits) >= 2, first.log
    root = make_root(tmp_path / "torn")
    argv = ["--params", str(root / "params.yaml")]
    killed = killer.run(module, argv, tmp_path / "torn_work", kill_at=commits[1] + 1)  # after 2nd save
    assert killed.exitcode == -9
    ckpt = root / "models" / state_file
    assert ckpt.is_file() and previous_path(ckpt).is_file()
    _truncate(ckpt)
    again = killer.run(module, argv, tmp_path / "torn_rerun")
    assert again.exitcode == 0, again.stderr[-2000:]
    assert "resuming from the previous checkpoint" in again.stderr
    assert diff_trees(base, root, outputs) == [] and not leftovers(root)
    assert not ckpt.exists() and not previous_path(ckpt).exists()  # removed with the finished run
