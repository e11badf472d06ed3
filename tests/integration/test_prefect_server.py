"""Against a REAL `prefect server` on a free loopback port: `python -m flows.serve` registers the
deployment with its cron schedule (checked through the API), a run triggered through the API
completes, and a bad cron is one error line."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOYMENT = "dalle-test-deploy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", proc, 180)
        yield env
    finally:
        _stop(proc)
        log.close()


def _tiny_params(workdir: Path, cron: str) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["schedule"] = {"cron": cron, "timezone": "Europe/Paris", "deployment": DEPLOYMENT}
    raw["data"]["synthetic"]["n_images"], raw["data"]["shard_size"] = 60, 30
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def _deploy_and_run(timeout: float) -> tuple[object, object]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    async with get_client() as client:
        end = time.monotonic() + timeout
        while True:  # the serve process registers the deployment shortly after it starts
            try:
                deployment = await client.read_deployment_by_name(f"dalle-pipeline/{DEPLOYMENT}")
                break
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(1)
    flow_run = await run_deployment(deployment.id, timeout=timeout, poll_interval=2)
    return deployment, flow_run


def test_served_deployment_has_schedule_and_runs(server, tmp_path) -> None:
    params = _tiny_params(tmp_path, "*/30 * * * *")
    env = {**server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--params", str(params),
                              "--workdir", str(tmp_path), "--stages", "collect,dedup"], cwd=REPO, env=env,
                             stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        os.environ.update({k: server[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
        deployment, flow_run = asyncio.run(_deploy_and_run(240))
    finally:
        for key in ("PREFECT_API_URL", "PREFECT_HOME"):
            os.environ.pop(key, None)
        _stop(serve)
    schedules = [s.schedule for s in deployment.schedules]
    assert [(s.cron, s.timezone) for s in schedules] == [("*/30 * * * *", "Europe/Paris")]
    assert deployment.parameters["workdir"] == str(tmp_path)
    assert deployment.parameters["stages"] == ["collect", "dedup"]
    assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "serve.log").read_text()[-3000:])
    assert (tmp_path / "data" / "raw" / "manifest.parquet").is_file()  # the real stages ran there
    assert (tmp_path / "data" / "dedup" / "manifest.parquet").is_file()


def test_bad_cron_is_one_line(server, tmp_path) -> None:
    params = _tiny_params(tmp_path, "every day at noon")
    out = subprocess.run([sys.executable, "-m", "flows.serve", "--params", str(params)], cwd=REPO,
                         env=server, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: schedule.cron: bad value 'every day at noon'")
    shutil.rmtree(tmp_path, ignore_errors=True)
