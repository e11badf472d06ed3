"""Round two, classes 8 and 9 (docs/reliability.md): a tampered or mismatched checkpoint is one
line naming the file and the problem (before a model is built from its config), and a training
state that cannot be read falls back to its `.prev`, or fails with a true message."""
from __future__ import annotations

import json
import logging
import resource
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dalle import cli
from dalle.errors import CheckpointError
from dalle.io import load_checkpoint, previous_path, save_checkpoint
from dalle.models.config import as_dict
from dalle.models.dvae import DiscreteVAE, DVAEConfig, load_dvae
from dalle.runner import run_guarded
from tests.reliability import killer
from tests.reliability.compare import diff_trees, leftovers
from tests.reliability.conftest import from_world
from tests.reliability.inprocess import seen

Mutation = Callable[[dict[str, torch.Tensor], dict[str, str]], None]


def _config(mutate: Callable[[dict], Any]) -> Mutation:
    def apply(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        config = json.loads(meta["dalle.config"])
        mutate(config)
        meta["dalle.config"] = json.dumps(config)
    return apply


def _first_weight(fn: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    def apply(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        name = sorted(k for k in tensors if tensors[k].ndim == 2)[0]
        tensors[name] = fn(tensors[name])
    return apply


def _tamper(src: Path, dst: Path, mutate: Mutation) -> Path:
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    mutate(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


CASES = [  # (id, mutation, what the one line must say)
    ("config-not-json", lambda t, m: m.update({"dalle.config": "{not json"}), "is not valid JSON"),
    ("config-a-list", lambda t, m: m.update({"dalle.config": "[1, 2]"}), "is a list, not a mapping"),
    ("config-lacks-a-key", _config(lambda c: c.pop("n_layers")), "lacks 'n_layers'"),
    ("wrong-shape", _first_weight(lambda w: torch.zeros(w.shape[0] + 1, w.shape[1])), "tensor"),
    ("nan-weights", _first_weight(lambda w: torch.full_like(w, float("nan"))), "NaN or infinite"),
    # ours: a config asking for a huge model is refused before anything is allocated
    ("huge-width", _config(lambda c: c.update(d_model=1 << 20)), "does not match its stored config"),
    ("huge-depth", _config(lambda c: c.update(n_layers=1 << 20)), "more than its"),
    ("zero-heads", _config(lambda c: c.update(n_heads=0)), "is invalid"),
]


@pytest.mark.parametrize("name,mutate,needle", CASES, ids=[c[0] for c in CASES])
def test_a_tampered_prior_is_one_line_naming_file_and_problem(world: Path, tmp_path: Path, name: str,
                                                               mutate: Mutation, needle: str) -> None:
    bad = _tamper(world / "models" / "prior.safetensors", tmp_path / "prior.safetensors", mutate)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = seen(lambda: cli.main(["generate", "a red circle", "-o", str(tmp_path / "x.png"),
                                 "--params", str(world / "params.yaml"), "--model", str(bad)]))
    line = out.clean_error()
    assert str(bad) in line and needle in line, line
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
    print(f"{name}: {line}")


def test_a_tampered_dvae_is_one_line(tmp_path: Path) -> None:  # ours: another loader
    config = DVAEConfig(vocab_size=16, n_hid=8, n_blk_per_group=1, group_count=2, n_init=8,
                        dec_n_hid=8, image_size=16)
    path = save_checkpoint(tmp_path / "dvae.safetensors", DiscreteVAE(config).state_dict(), as_dict(config))
    _tamper(path, path, _config(lambda c: c.update(group_count=1 << 24)))
    line = seen(lambda: run_guarded(lambda: load_dvae(path))).clean_error()
    assert str(path) in line, line


# ------------------------------------------------------------------ class 9: torn state files
def _state(tmp_path: Path) -> Path:
    ckpt = tmp_path / "state.safetensors"
    for step in (1, 2):
        save_checkpoint(ckpt, {"w": torch.full((4,), float(step))}, {"n": 4}, state={"step": step})
    return ckpt


def _header_length(path: Path, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))


TORN: list[tuple[str, Callable[[Path], None]]] = [
    ("header-2^64", lambda p: _header_length(p, 2 ** 64 - 1)),  # listed: OverflowError before
    ("header-2^41", lambda p: _header_length(p, 2 ** 41)),  # listed: "out of memory" before
    ("header-a-list", lambda p: p.write_bytes(b"\x06\x00\x00\x00\x00\x00\x00\x00[1,2] ")),  # ours
    ("state-lacks-a-tensor", lambda p: _tamper(p, p, lambda t, m: t.pop("__state__.step", None)
                                               or m.update({"dalle.state": '{"__tensor__": "nope"}'}))),
]


@pytest.mark.parametrize("name,tear", TORN, ids=[t[0] for t in TORN])
def test_an_unreadable_state_falls_back_to_prev(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                name: str, tear: Callable[[Path], None]) -> None:
    ckpt = _state(tmp_path)
    tear(ckpt)
    with caplog.at_level(logging.WARNING, logger="dalle.io"):
        weights, _, state = load_checkpoint(ckpt, {"n": 4}, with_state=True)
    assert state["step"] == 1 and torch.equal(weights["w"], torch.ones(4))
    assert "resuming from the previous checkpoint" in caplog.text
    previous_path(ckpt).unlink()
    with pytest.raises(CheckpointError) as err:  # without a .prev: one true line
        load_checkpoint(ckpt, {"n": 4}, with_state=True)
    assert str(ckpt) in err.value.one_line() and "memory" not in err.value.one_line()
    print(f"{name}: {err.value.one_line()}")


def test_when_prev_is_torn_too_the_message_says_both(tmp_path: Path) -> None:  # ours
    ckpt = _state(tmp_path)
    _header_length(ckpt, 2 ** 64 - 1)
    _header_length(previous_path(ckpt), 2 ** 41)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt, {"n": 4}, with_state=True)
    line = err.value.one_line()
    assert str(ckpt) in line and str(previous_path(ckpt)) in line and "cannot be used either" in line


def test_a_stage_resumes_past_a_state_with_a_2_64_header(world: Path, tmp_path: Path) -> None:
    """train_prior killed after its 2nd state checkpoint, whose header length is then set to
    2^64 - 1: the rerun warns, resumes from `.prev` and ends equal to an uninterrupted run."""
    make_root = from_world(world, "train_prior", {"tokenizer.bpe_dropout": 0.0})
    base = make_root(tmp_path / "base")
    first = killer.run("stages.train_prior", ["--params", str(base / "params.yaml")], tmp_path / "bw")
    commits = [i for i, e in enumerate(first.log, 1) if e == "commit prior.ckpt.safetensors"]
    root = make_root(tmp_path / "torn")
    argv = ["--params", str(root / "params.yaml")]
    assert killer.run("stages.train_prior", argv, tmp_path / "kw", kill_at=commits[1] + 1).exitcode == -9
    _header_length(root / "models" / "prior.ckpt.safetensors", 2 ** 64 - 1)
    again = killer.run("stages.train_prior", argv, tmp_path / "rw")
    assert again.exitcode == 0, again.stderr[-2000:]
    assert "resuming from the previous checkpoint" in again.stderr
    assert diff_trees(base, root, ["models", "metrics", "plots"]) == [] and not leftovers(root)


def test_a_state_that_does_not_fit_is_one_line(world: Path, tmp_path: Path) -> None:  # ours
    """A state whose skeleton lost its optimiser (it parses, but cannot be restored)."""
    root = from_world(world, "train_prior", {"tokenizer.bpe_dropout": 0.0})(tmp_path / "r")
    argv = ["--params", str(root / "params.yaml")]
    first = killer.run("stages.train_prior", argv, tmp_path / "w0", kill_at=10_000)
    commits = [i for i, e in enumerate(first.log, 1) if e == "commit prior.ckpt.safetensors"]
    shutil.rmtree(root)
    root = from_world(world, "train_prior", {"tokenizer.bpe_dropout": 0.0})(tmp_path / "r")
    assert killer.run("stages.train_prior", argv, tmp_path / "w1", kill_at=commits[0] + 1).exitcode == -9
    state = root / "models" / "prior.ckpt.safetensors"

    def drop_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        skeleton = json.loads(meta["dalle.state"])
        skeleton["__map__"] = [kv for kv in skeleton["__map__"] if kv[0] != "optimizer"]
        meta["dalle.state"] = json.dumps(skeleton)

    _tamper(state, state, drop_optimizer)
    out = killer.run("stages.train_prior", argv, tmp_path / "w2")
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.exitcode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert str(state) in lines[0] and "cannot be restored" in lines[0], lines[0]
