"""Screenshots for the README: the Prefect deployment (with its cron schedule), a flow run, and the
MLflow run-comparison view, taken with headless Chromium (Debian `chromium`, driven by Playwright;
nothing is downloaded: `pip install playwright`, never `playwright install`).

    .venv/bin/python scripts/screenshots.py [--out docs/img] [-S key=value ...]

Starts `prefect server` and `mlflow ui` on free loopback ports (state in a temp dir), serves the
deployment from `flows.serve`, runs the pipeline twice through the Prefect API on the params given
(the second run with prior.n_layers + 1, so the comparison has something to compare), then saves
prefect-deployment.png, prefect-flow-run.png and mlflow-compare.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: {url} did not come up in {timeout:.0f}s")


async def run_twice(deployment: str, overrides: list[str], timeout: float) -> tuple[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    async with get_client() as client:
        for _ in range(120):
            try:
                dep = await client.read_deployment_by_name(f"dalle-pipeline/{deployment}")
                break
            except Exception:  # noqa: BLE001 - not registered yet
                await asyncio.sleep(1)
        else:
            raise SystemExit(f"error: deployment {deployment} was never registered")
    runs = []
    layers = next((int(o.split("=")[1]) for o in overrides if o.startswith("prior.n_layers=")), 4)
    for extra in ([], [f"prior.n_layers={layers + 1}"]):
        run = await run_deployment(dep.id, parameters={"overrides": overrides + extra},
                                   timeout=timeout, poll_interval=3)
        if not run.state.is_completed():
            raise SystemExit(f"error: flow run {run.name} ended {run.state.type.value}")
        runs.append(str(run.id))
    return str(dep.id), runs


def mlflow_compare_url(base: str, db: str) -> str:
    """The MLflow UI's comparison of the two newest pipeline (parent) runs."""
    from dalle.runs import search_runs
    from dalle.tracking import make_client

    runs = json.dumps([r.run_id for r in search_runs("dalle", uri=db)[:2]])
    exp_id = make_client(db).get_experiment_by_name("dalle").experiment_id
    return (f"{base}/#/compare-runs?runs={urllib.parse.quote(runs)}"
            f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}")


def workspace(tmp: Path, stages: Path) -> Path:
    """A scratch copy of the stage scripts and params, so the repo's data/ is left alone."""
    work = tmp / "work"
    shutil.copytree(stages, work / "stages")
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    return work


def _close_side_panels(page) -> None:
    """Hide MLflow 3's assistant side panel, which would cover half the comparison."""
    import re

    for button in page.get_by_role("button", name=re.compile(r"^close", re.I)).all():
        try:
            button.click(timeout=2000)
            page.wait_for_timeout(800)
        except Exception:  # noqa: BLE001 - not visible: nothing to close
            pass


def shoot(pages: dict[str, str], out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        for name, url in pages.items():
            page.goto(url, wait_until="load", timeout=60_000)  # the UIs poll: never network-idle
            page.wait_for_timeout(8000)  # client-side rendering of the fetched runs
            _close_side_panels(page)
            page.screenshot(path=str(out / name), full_page=False)
            print(f"wrote {out / name}")
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--stages", default=str(REPO / "stages"), help="stage scripts to run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dalle-shots-"))
    pport, mport = free_port(), free_port()
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "MLFLOW_TRACKING_URI": db,
           "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")})
    procs = [start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                    str(pport)], env, tmp / "prefect.log"),
             start([str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(mport),
                    "--backend-store-uri", db, "--default-artifact-root", str(tmp / "mlartifacts")],
                   env, tmp / "mlflow.log")]
    try:
        wait_http(f"http://127.0.0.1:{pport}/api/health")
        wait_http(f"http://127.0.0.1:{mport}/health")
        work = workspace(tmp, Path(args.stages))
        procs.append(start([sys.executable, "-m", "flows.serve", "--params",
                            str(work / "params.yaml"), "--workdir", str(work)], env, tmp / "serve.log"))
        from dalle.config import load_params

        deployment = load_params(REPO / "params.yaml").schedule.deployment
        dep_id, runs = asyncio.run(run_twice(deployment, args.overrides, args.timeout))
        shoot({"prefect-deployment.png": f"http://127.0.0.1:{pport}/deployments/deployment/{dep_id}",
               "prefect-flow-run.png": f"http://127.0.0.1:{pport}/runs/flow-run/{runs[-1]}",
               "mlflow-compare.png": mlflow_compare_url(f"http://127.0.0.1:{mport}", db)}, out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        print(f"logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
