"""Round two, class 12 (docs/reliability.md): values that validate but cannot train. A run whose
loss stays non-finite stops with one line and exports nothing; metrics and curves files are
always strict JSON (a NaN is written as null). (Non-finite params are refused by validation:
test_bad_arguments.py.)"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dalle.curves import CurveRecorder
from dalle.io import write_json
from dalle.tracking import NullTracker
from tests.reliability import killer
from tests.reliability.conftest import from_world


def _strict(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}: not valid JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_metrics_files_are_strict_json(tmp_path: Path) -> None:  # listed: NaN in prior.json
    path = write_json(tmp_path / "prior.json", {"loss": float("nan"), "val": [1.0, float("inf")],
                                                "ok": 2.5, "steps": 6})
    assert _strict(path) == {"loss": None, "val": [1.0, None], "ok": 2.5, "steps": 6}


def test_curves_files_are_strict_json(tmp_path: Path) -> None:  # ours: the DVC plots file
    recorder = CurveRecorder(NullTracker(), journal=tmp_path / ".journal.jsonl")
    recorder.log_metrics({"loss": 1.5}, step=1)
    recorder.log_metrics({"loss": float("nan")}, step=2)
    recorder.write(tmp_path / "curves.json")
    assert _strict(tmp_path / "curves.json") == [{"step": 1, "loss": 1.5}, {"step": 2, "loss": None}]


@pytest.mark.parametrize("stage,lr", [("train_prior", "prior.lr"), ("train_dvae", "dvae.lr")])
def test_a_diverging_run_stops_in_one_line_and_exports_nothing(world: Path, tmp_path: Path,
                                                               stage: str, lr: str) -> None:
    """lr 1e30 is finite, so it validates; the first update sends the weights (or the loss) to
    inf/NaN: the loop stops at the next logged row or checkpoint, before anything is saved."""
    root = from_world(world, stage, {lr: 1e30})(tmp_path / "r")
    out = killer.run(f"stages.{stage}", ["--params", str(root / "params.yaml")], tmp_path / "w")
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.exitcode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "lower the learning rate" in lines[0] and ("nan" in lines[0].lower()), lines[0]
    models = root / "models"
    exported = {p.name for p in models.iterdir()} if models.is_dir() else set()
    assert not {f"{stage.split('_')[1]}.safetensors"} & exported, exported
    for state in models.glob("*.safetensors*") if models.is_dir() else ():  # no NaN state saved
        assert all(torch.isfinite(t).all() for t in load_file(str(state)).values()
                   if t.is_floating_point()), state
    metrics = root / "metrics" / f"{stage.split('_')[1]}.json"
    assert not metrics.exists() or all(math.isfinite(v) for v in _strict(metrics).values()
                                       if isinstance(v, float))
    print(lines[0])
