"""dalle.io: atomic writes, safetensors checkpoints with config, refusal of pickles/truncation."""
from __future__ import annotations

import pickle

import pytest
import torch

from dalle.errors import CheckpointError, OutputError
from dalle.io import (atomic_dir, atomic_path, load_checkpoint, save_checkpoint,
                      write_json)


def test_atomic_path_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_dir_replaces_whole(tmp_path) -> None:
    target = tmp_path / "dir"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]


def test_checkpoint_roundtrip_with_nested_state(tmp_path) -> None:
    weights = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    state = {"step": 7, "opt": {"exp_avg": [torch.ones(2), torch.arange(3)]}, "betas": (0.9, 0.96)}
    path = save_checkpoint(tmp_path / "m.safetensors", weights, {"d": 4}, state=state)
    got, config, got_state = load_checkpoint(path, expected_config={"d": 4}, with_state=True)
    assert torch.equal(got["w"], weights["w"]) and set(got) == {"w", "b"}
    assert config == {"d": 4}
    assert got_state["step"] == 7 and got_state["betas"] == (0.9, 0.96)
    assert torch.equal(got_state["opt"]["exp_avg"][1], torch.arange(3))


def test_checkpoint_errors_are_one_line(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.randn(64, 64)}, {"d": 4, "k": 1})
    with pytest.raises(CheckpointError, match=r"different config: d is 4 in the checkpoint but 8"):
        load_checkpoint(path, expected_config={"d": 8, "k": 1})
    data = path.read_bytes()
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors") as info:
        load_checkpoint(torn)
    assert "\n" not in str(info.value)
    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(pkl)
    zipped = tmp_path / "torch.pt"
    torch.save({"w": torch.ones(1)}, zipped)
    with pytest.raises(CheckpointError, match="pickle/torch.save"):
        load_checkpoint(zipped)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_unwritable_output_path_under_a_file(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        write_json(blocker / "x.json", {"a": 1})


def test_atomic_files_get_the_usual_mode(tmp_path) -> None:
    import os

    path = write_json(tmp_path / "m.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
