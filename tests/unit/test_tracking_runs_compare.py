"""`dalle runs compare`: quality columns first (the names the stages' metrics get on the pipeline
run), only the params that differ, every line within 120 columns, `--metrics`/`--params`, a PNG
of curves, one-line errors."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from dalle import tracking
from dalle.cli import main
from dalle.commands.runs_table import (abbreviate, default_metrics, fmt_seconds, format_table,
                                       varying_params, wall_seconds)
from dalle.config import load_params
from dalle.runs import RunRecord

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HEADER = ["pipeline", "started", "status", "seen@32", "held@32", "val", "loss", "dVAE",
                  "top1", "wall"]
# What each stage logs, as the stages name it (the pipeline run gets them as <stage>/<name>).
STAGE_METRICS = {
    "train_dvae": lambda q: {"final_oracle_all_correct_recon": 0.4 + q, "final_val_recon_mse": 0.004},
    "train_clip": lambda q: {"retrieval_top1": 0.9},
    "evaluate": lambda q: {"oracle_all_correct_seen_n32": 0.5 + q, "fid_all_n32": 0.11,
                           **({"oracle_all_correct_holdout_n32": 0.2} if q else {})},
}


def _seed(monkeypatch, steps: int, pid: str, quality: float) -> None:
    """One pipeline run `pid`: the stages that carry the quality figures, on prior.steps=`steps`."""
    monkeypatch.setenv(tracking.PIPELINE_ENV, pid)
    params = load_params(REPO / "params.yaml", overrides=[f"prior.steps={steps}",
                                                          "tracking.experiment=cmp"])
    with tracking.stage_run("train_prior", params) as t:
        for step in range(5):
            t.log_metrics({"loss": 5.0 / (step + steps)}, step=step * 10)
        t.log_metrics({"val_loss": 1.0 / steps, "val_loss_image": 0.9 / steps}, step=40)
    for stage, metrics in STAGE_METRICS.items():
        with tracking.stage_run(stage, params) as t:
            t.log_metrics({**metrics(quality), "stage_seconds": 1.5})


def test_compare_leads_with_quality(tmp_mlflow, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # stages leave metrics/curves/*.json in the working directory
    _seed(monkeypatch, 2, "p2", 0.0)
    _seed(monkeypatch, 8, "p8", 0.25)
    out = tmp_path / "cmp.png"
    assert main(["runs", "compare", "--experiment", "cmp", "--plot", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == DEFAULT_HEADER + ["prior.steps"]  # the one param that differs
    newest, older = lines[2].split(), lines[3].split()
    assert newest[0] == "p8" and older[0] == "p2"  # newest first
    assert newest[4:9] == ["0.75", "0.2", "0.125", "0.65", "0.9"] and newest[-1] == "8"
    assert older[4:9] == ["0.5", "-", "0.5", "0.4", "0.9"] and older[-1] == "2"  # no held-out: -
    assert newest[9].endswith("s") and older[9].endswith("s")  # wall time, e.g. 3s
    assert "fid" not in lines[0] and "seen@32 = evaluate/oracle_all_correct_seen_n32" in lines[4]
    assert all(len(line) <= 120 for line in lines)
    assert "wrote" in lines[-1] and "of 2 train_prior run(s)" in lines[-1]
    assert Image.open(out).size[0] > 300


def test_compare_stage_runs_and_chosen_columns(tmp_mlflow, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _seed(monkeypatch, 2, "p2", 0.0)
    _seed(monkeypatch, 8, "p8", 0.25)
    assert main(["runs", "compare", "--experiment", "cmp", "--stage", "train_prior"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "started", "status", "val", "loss", "wall", "prior.steps"]
    assert lines[2].startswith("train_prior ") and lines[2].split()[5] == "0.125"
    assert main(["runs", "compare", "--experiment", "cmp", "--stage", "train_prior",
                 "--metrics", "loss", "--params", "prior.n_layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["loss", "prior.n_layers"] and len(lines) == 4
    assert lines[2].split()[-2] == "0.4167"  # the last logged loss, 5/12
    assert main(["runs", "compare", "--experiment", "cmp", "--metrics",
                 "train_prior/val_loss_image,evaluate/oracle_seen_n32"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[3:] == ["val", "image", "eval/oracle_seen_n32", "prior.steps"]
    assert lines[2].split()[4:6] == ["0.1125", "-"]  # 0.9 / 8; a metric no run has: -
    assert captured.err.strip() == ("note: no run shown has metric 'evaluate/oracle_seen_n32'; "
                                    "did you mean evaluate/oracle_all_correct_seen_n32?")


def _record(i: int, params: dict[str, str], metrics: dict[str, float]) -> RunRecord:
    start = 1_800_000_000_000 + i * 3_600_000
    return RunRecord(f"{i:032x}", f"pipeline prefect-{i:08x}-d801-4ef8-8248-9d0ba1bab269",
                     "FINISHED", start, "pipeline", "", params, metrics, start + 564_000)


def test_table_fits_120_columns_with_many_runs_and_long_params() -> None:
    runs = [_record(i, {**{f"data.synthetic.an_unusually_long_knob_name_{j}": f"value-{i}-" + "x" * 30
                           for j in range(12)}, "seed": "0", "paths.raw": f"/tmp/run{i}/raw"},
                    {"evaluate/oracle_all_correct_seen_n32": 0.5 + i / 100, "train_prior/val_loss": 1.1})
            for i in range(40)]
    params = varying_params(runs)
    assert "seed" not in params and params[-1] == "paths.raw"  # same everywhere; paths last
    for width in (120, 100):
        lines = format_table(runs, params, default_metrics(runs), width=width).splitlines()
        assert max(len(line) for line in lines) <= width and len(lines) > 42
        assert lines[0].split()[3:5] == ["seen@32", "held@32"]
        assert lines[2].split()[4:7] == ["0.5", "-", "1.1"] and lines[2].split()[9] == "9m24s"
        note = " ".join(lines[lines.index(next(x for x in lines if x.startswith("not shown"))):])
        assert "paths.raw" in note and "--params" in note  # what was left out is named
    wide = format_table(runs, params, default_metrics(runs), width=400).splitlines()
    assert max(len(line) for line in wide) > 120  # the limit is what keeps it narrow


def test_abbreviations_and_wall_time() -> None:
    assert abbreviate("evaluate/oracle_all_correct_holdout_n32", 14) == "held@32"
    assert abbreviate("data.synthetic.n_images", 14) == "d.s.n_images"
    assert abbreviate("evaluate/oracle_all_correct_seen_n4", 14) == "seen@4"  # any N
    assert abbreviate("train_prior/val_loss_image", 14) == "val image"
    assert abbreviate("train_dvae/final_val_recon_mse", 30) == "train_dvae/final_val_recon_mse"
    assert abbreviate("train_dvae/final_val_recon_mse", 24) == "dvae/final_val_recon_mse"
    assert abbreviate("train_dvae/final_val_recon_mse", 20) == "final_val_recon_mse"
    assert abbreviate("train_dvae/final_val_recon_mse", 10) == "fina…n_mse"
    assert len(abbreviate("x" * 50, 14)) == 14 and abbreviate("seed", 14) == "seed"
    run = _record(0, {}, {"a/stage_seconds": 60.0, "b/stage_seconds": 4.4})
    assert wall_seconds(run) == 564.0 and fmt_seconds(564.0) == "9m24s"
    running = RunRecord("r", "pipeline x", "RUNNING", 0, "pipeline", "", {},
                        {"a/stage_seconds": 60.0, "b/stage_seconds": 4.4}, None)
    assert wall_seconds(running) == pytest.approx(64.4) and fmt_seconds(3725) == "1h02m"
    assert fmt_seconds(None) == "-" and wall_seconds(replace(_record(1, {}, {}), end_time=None)) is None


def test_oracle_at_the_largest_n_when_no_run_has_32() -> None:
    small = [_record(0, {}, {"evaluate/oracle_all_correct_seen_n1": 0.1,
                             "evaluate/oracle_all_correct_seen_n4": 0.2,
                             "evaluate/oracle_all_correct_holdout_n4": 0.0})]
    assert default_metrics(small)[:3] == ["evaluate/oracle_all_correct_seen_n4",
                                          "evaluate/oracle_all_correct_holdout_n4",
                                          "train_prior/val_loss"]
    mixed = [*small, _record(1, {}, {"evaluate/oracle_all_correct_seen_n32": 0.5})]
    assert default_metrics(mixed)[0] == "evaluate/oracle_all_correct_seen_n32"
    stage = [replace(r, metrics={k.split("/")[1]: v for k, v in r.metrics.items()}) for r in small]
    assert default_metrics(stage, "evaluate") == ["oracle_all_correct_seen_n4",
                                                  "oracle_all_correct_holdout_n4", "wall"]
    assert format_table(small, [], default_metrics(small)).split()[3:5] == ["seen@4", "held@4"]


def test_compare_unknown_experiment_is_one_line(tmp_mlflow, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "compare", "--experiment", "no-such-exp"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: experiment 'no-such-exp' does not exist in {tmp_mlflow}"]
