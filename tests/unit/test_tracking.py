"""dalle.tracking: parent/child runs, model registry + fetch, URI resolution, bad servers,
concurrent writers."""
from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dalle import runs, tracking
from dalle.config import load_params

REPO = Path(__file__).resolve().parents[2]


def _params(**over: str):
    return load_params(REPO / "params.yaml", overrides=[f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def uri(db, monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    monkeypatch.chdir(tmp_path)  # stages leave metrics/curves/*.json in the working directory
    return db


def test_original_root_inside_dvc_temp_copy(tmp_path) -> None:
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12" / "src"
    assert tracking.original_root(copy.parent) == (tmp_path / "repo").resolve()
    assert tracking.original_root(tmp_path) == tmp_path.resolve()


def test_default_uri_precedence(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.default_uri("http://cfg:1") == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.default_uri("http://cfg:1") == "http://cfg:1"
    monkeypatch.delenv("DALLE_TEST", raising=False)
    assert tracking.default_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    monkeypatch.setenv("DALLE_TEST", "1")
    assert "dalle-test-mlflow.db" in tracking.default_uri()
    assert tracking.artifact_root("sqlite:////x/y/mlflow.db") == "file:///x/y/mlartifacts"


def test_disabled_or_nonzero_rank_is_null(tmp_path, monkeypatch) -> None:
    from dalle.stage import tracked

    monkeypatch.chdir(tmp_path)
    with tracked("s", _params(**{"tracking.enabled": "false"})) as t:
        assert not t.enabled
        t.log_metrics({"loss": 2.0, "lr": 0.1}, step=2)
        t.log_metrics({"loss": 1.0}, step=4)
        t.log_metrics({"final": 1.0})  # no step: not a curve point
    # the curves become a DVC plots file even with tracking off
    assert json.loads((tmp_path / "metrics" / "curves" / "s.json").read_text()) == [
        {"step": 2, "loss": 2.0, "lr": 0.1}, {"step": 4, "loss": 1.0}]
    with tracking.stage_run("s", _params(), rank=1) as t:
        assert not t.enabled and t.register_model("m", []) is None


def test_parent_and_child_runs(uri, monkeypatch) -> None:
    monkeypatch.setenv(tracking.PIPELINE_ENV, "pipe-a")
    params = _params(**{"tracking.experiment": "unit-a"})
    for stage in ("train_dvae", "train_prior"):
        with tracking.stage_run(stage, params) as t:
            for step in range(3):
                t.log_metrics({"loss": 3.0 - step, "flag": True}, step=step)
    with pytest.raises(RuntimeError), tracking.stage_run("evaluate", params):
        raise RuntimeError("boom")
    parents = runs.search_runs("unit-a", uri=uri)
    assert len(parents) == 1 and parents[0].status == "FAILED"
    assert parents[0].metrics == {"train_dvae/loss": 1.0, "train_prior/loss": 1.0}
    assert parents[0].params["prior.n_layers"] == "4"
    stages = runs.search_runs("unit-a", kind="stage", uri=uri)
    assert sorted(r.stage for r in stages) == ["evaluate", "train_dvae", "train_prior"]
    prior = next(r for r in stages if r.stage == "train_prior")
    assert runs.metric_history(prior.run_id, "loss", uri=uri) == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert "flag" not in prior.metrics  # booleans are not metrics


def test_register_and_fetch_model(uri, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(tracking.PIPELINE_ENV, "pipe-b")
    params = _params(**{"tracking.experiment": "unit-b"})
    files = [tmp_path / "prior.safetensors", tmp_path / "prior.json"]
    versions = []
    for i, good in enumerate((True, False)):
        for f in files:
            f.write_text(f"v{i}")
        with tracking.stage_run("train_prior", params) as t:
            versions.append(t.register_model("unit-prior", files, "prior", good=good))
    assert versions == ["1", "2"]
    good = runs.fetch_model("models:/unit-prior@good", tmp_path / "a")
    assert (good / "prior.safetensors").read_text() == "v0"  # the alias skips the bad version
    for ref in ("models:/unit-prior@latest", "models:/unit-prior/latest", "models:/unit-prior/2"):
        assert (runs.fetch_model(ref, tmp_path / ref[-6:]) / "prior.json").read_text() == "v1"
    with pytest.raises(tracking.TrackingError, match="not in the registry"):
        runs.fetch_model("models:/nope@good")
    with pytest.raises(tracking.TrackingError, match="does not exist"):
        with tracking.stage_run("train_prior", params) as t:
            t.register_model("unit-prior", [tmp_path / "missing.safetensors"])
    assert runs.fetch_model(str(tmp_path)) == tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line_and_fast(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="not reachable.*embedded sqlite"):
        with tracking.stage_run("collect", _params()):
            pass
    assert time.monotonic() - start < 10


def test_stage_entry_point_with_dead_server_exits_1(tmp_path) -> None:
    script = ("from dalle.stage import Out, StageSpec; StageSpec('probe', lambda art, t: {}, (), "
              "lambda a: (), lambda a: (), 'a probe').main()")
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script, "--params", str(REPO / "params.yaml")],
                         capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow server") and "Traceback" not in out.stderr


def _writer(uri: str, tag: str, n: int) -> None:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(Path(uri[len("sqlite:///"):]).parent)
    os.environ[tracking.PIPELINE_ENV] = "pipe-concurrent"
    with tracking.stage_run(f"writer-{tag}", _params(**{"tracking.experiment": "unit-c"})) as t:
        for step in range(n):
            t.log_metrics({"loss": float(step)}, step=step)
            t.set_tags({"progress": str(step)})


def test_two_concurrent_writers_do_not_corrupt(db) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, tag, 60)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    stages = runs.search_runs("unit-c", kind="stage", uri=db)
    assert sorted(r.stage for r in stages) == ["writer-a", "writer-b"]
    for r in stages:
        assert [v for _, v in runs.metric_history(r.run_id, "loss", uri=db)] == list(map(float, range(60)))
    assert len(runs.search_runs("unit-c", uri=db)) == 1  # one parent for both
