"""flows/pipeline.py under prefect_test_harness, with small stand-in stages in place of the DAG
(the real stages run in the DVC test): DAG order, retries on collect, MLflow parent + children,
Prefect artifacts, `dalle.*` logs in the Prefect run, one-line errors for bad input."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

prefect_testing = pytest.importorskip("prefect.testing.utilities")

from dalle import runs, tracking  # noqa: E402
from tests.integration.flow_standins import install  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    with prefect_testing.prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    install(monkeypatch)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_flow_runs_dag_with_retry_tracking_and_artifacts(harness, workdir, monkeypatch) -> None:
    import flows.pipeline as fp
    import flows.tasks as ft

    monkeypatch.setattr(ft, "collect_task", ft.collect_task.with_options(retry_delay_seconds=0))
    (workdir / "collect.flaky").touch()  # the first collect attempt fails, the retry succeeds
    state = fp.dalle_pipeline(params_file="params.yaml", overrides=["prior.n_layers=3"],
                              workdir=str(workdir), return_state=True)
    assert state.is_completed(), state
    results = state.result()
    order = (workdir / "order.log").read_text().split()
    assert order == ["collect", "dedup", "evaluate"], order
    assert [r["stage"] for r in results] == ["collect", "dedup", "evaluate"]
    timing = {k: results[0]["metrics"].pop(k) for k in ("stage_seconds", "reference_matmul_gflops")}
    assert results[0]["metrics"] == {"loss": 1 / 3, "n_layers": 3, "seen": "collect"}
    assert timing["stage_seconds"] >= 0 and timing["reference_matmul_gflops"] > 0  # dalle.speed
    assert results[0]["outs"] == ["data/raw"] and results[2]["outs"][0] == "plots/fid_blur.json"
    json.dumps(results)  # plain JSON, no tensors

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parents = runs.search_runs("dalle", uri=uri)
    assert len(parents) == 1 and parents[0].status == "FINISHED"
    assert parents[0].name == f"pipeline prefect-{state.state_details.flow_run_id}"
    assert parents[0].metrics["evaluate/loss"] == pytest.approx(1 / 3)
    children = runs.search_runs("dalle", kind="stage", uri=uri)
    # the failed first collect attempt is its own (FAILED) run under the same parent
    assert sorted((c.stage, c.status) for c in children) == [
        ("collect", "FAILED"), ("collect", "FINISHED"), ("dedup", "FINISHED"),
        ("evaluate", "FINISHED")]

    from prefect.client.orchestration import get_client

    async def artifacts():  # raw filter body: this client sends nulls the server rejects
        body = {"artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}},
                "limit": 50, "offset": 0, "sort": "KEY_ASC"}
        async with get_client() as client:
            resp = await client._client.post("/artifacts/latest/filter", json=body)
            return resp.json()

    async def logs():
        body = {"logs": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}},
                "limit": 200, "offset": 0, "sort": "TIMESTAMP_ASC"}
        async with get_client() as client:
            return (await client._client.post("/logs/filter", json=body)).json()

    for _ in range(20):  # the log handler ships records in the background
        messages = [rec["message"] for rec in asyncio.run(logs())]
        if any("stand-in evaluate ran" in m for m in messages):
            break
        time.sleep(0.5)
    assert any("stand-in collect ran" in m for m in messages), messages  # dalle.* in the UI
    got = asyncio.run(artifacts())
    assert isinstance(got, list), got
    found = {a["key"]: a for a in got}
    assert "dalle-summary" in found, got
    summary = found["dalle-summary"]["data"]
    assert "| evaluate | loss | 0.33333 |" in summary and "#/experiments/" in summary
    table = found["dalle-eval-metrics"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {"stage": "evaluate", "metric": "loss", "value": 1 / 3} in table


def test_flow_cli_bad_input_is_one_line(workdir) -> None:
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=workdir,
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                   "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/m.db", **(env or {})})

    out = run("--stages", "collect,nope")
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: unknown stage 'nope'; stages: collect, dedup, prepare, tokenizer, train_dvae, "
        "encode, train_prior, train_clip, generate, evaluate"]
    out = run("-S", "prior.n_layers=zero")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "prior.n_layers" in out.stderr
    dead = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out = run(env=dead)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
        "error: Prefect server http://127.0.0.1:9/api is not reachable")
    assert len(out.stderr.strip().splitlines()) == 1
    out = run(env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert out.returncode == 1 and out.stderr.strip().startswith("error: MLflow server")
    assert "embedded sqlite" in out.stderr and len(out.stderr.strip().splitlines()) == 1
