"""`dalle runs compare`: table of pipeline/stage runs, PNG of curves, one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dalle import tracking
from dalle.cli import main
from dalle.config import load_params

REPO = Path(__file__).resolve().parents[2]


def _seed(monkeypatch, n_layers: int, pid: str) -> None:
    monkeypatch.setenv(tracking.PIPELINE_ENV, pid)
    params = load_params(REPO / "params.yaml", overrides=[f"prior.n_layers={n_layers}",
                                                          "tracking.experiment=cmp"])
    with tracking.stage_run("train_prior", params) as t:
        for step in range(5):
            t.log_metrics({"loss": 5.0 / (step + n_layers)}, step=step * 10)


def test_compare_table_and_plot(tmp_mlflow, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # stages leave metrics/curves/*.json in the working directory
    _seed(monkeypatch, 2, "p2")
    _seed(monkeypatch, 8, "p8")
    out = tmp_path / "cmp.png"
    assert main(["runs", "compare", "--experiment", "cmp", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "prior.n_layers" in lines[0] and "train_prior/loss" in lines[0]
    assert lines[2].startswith("pipeline p8") and lines[3].startswith("pipeline p2")  # newest first
    assert "0.4167" in lines[2] and "0.8333" in lines[3]  # final losses 5/12 and 5/6
    assert "wrote" in lines[-1] and "of 2 train_prior run(s)" in lines[-1]
    assert Image.open(out).size[0] > 300
    assert main(["runs", "compare", "--experiment", "cmp", "--stage", "train_prior",
                 "--metrics", "loss"]) == 0
    stage_lines = capsys.readouterr().out.splitlines()
    assert stage_lines[0].split()[-1] == "loss" and len(stage_lines) == 4


def test_compare_unknown_experiment_is_one_line(tmp_mlflow, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "compare", "--experiment", "no-such-exp"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: experiment 'no-such-exp' does not exist in {tmp_mlflow}"]
