"""Screenshots for the README: the Prefect deployment (with its cron schedule), a flow run, and the
MLflow run-comparison view, taken with headless Chromium (Debian `chromium`, driven by Playwright;
nothing is downloaded: `pip install playwright`, never `playwright install`).

    .venv/bin/python scripts/screenshots.py [--out docs/img] [--knob prior.steps=10,150] [-S key=value ...]

Starts `prefect server` and `mlflow ui` on free loopback ports (state in a temp dir), serves the
deployment from `flows.serve`, runs the whole pipeline twice through the Prefect API on small
params (`SMALL`, then the `-S` given), the two runs differing in one knob (`--knob NAME=A,B`, by
default the prior's steps), then saves prefect-deployment.png, prefect-flow-run.png and
mlflow-compare.png. The comparison is MLflow's parallel-coordinates chart of the knob against
quality metrics of the pipeline runs (`--metrics`, by default the prior's val loss on image and
on all tokens), above the two runs' details and the params that differ.
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
# A small world and small models, so two whole pipeline runs take minutes on 2 cores.
SMALL = ["data.synthetic.n_images=480", "data.shard_size=240", "data.image_size=32",
         "data.eval_captions=16", "tokenizer.vocab_size=128", "tokenizer.text_len=16",
         "dvae.steps=40", "dvae.batch_size=16", "dvae.n_hid=8", "dvae.dec_n_hid=8",
         "dvae.vocab_size=64", "prior.batch_size=16", "prior.n_layers=2", "prior.d_model=64",
         "prior.n_heads=2", "prior.warmup_steps=5", "prior.sample_every=100000",
         "clip.steps=20", "clip.batch_size=16", "clip.embed_dim=16", "clip.text_width=16",
         "clip.image_width=8", "clip.text_layers=1", "clip.text_heads=2",
         "clip.retrieval_candidates=8", "generate.n_captions=8", "generate.candidates=4",
         "generate.keep=1", "evaluate.blur_radii=[0,2]", "evaluate.rerank_sizes=[1,4]"]
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


def parse_knob(text: str) -> tuple[str, list[str]]:
    """`prior.steps=10,150` -> ("prior.steps", ["10", "150"]): the knob the two runs differ in."""
    name, _, values = text.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not name or len(parts) != 2 or not all(parts):
        raise SystemExit(f"error: --knob {text!r}: expected NAME=A,B, e.g. prior.steps=10,150")
    return name.strip(), parts


async def run_twice(deployment: str, overrides: list[str], knob: tuple[str, list[str]],
                    timeout: float) -> tuple[str, list[str]]:
    """Run the deployment once per value of the knob; (deployment id, the flow run ids)."""
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
    name, values = knob
    for value in values:
        run = await run_deployment(dep.id, parameters={"overrides": overrides + [f"{name}={value}"]},
                                   timeout=timeout, poll_interval=3)
        if not run.state.is_completed():
            raise SystemExit(f"error: flow run {run.name} ended {run.state.type.value}")
        print(f"flow run {run.name}: {name}={value} completed")
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


def _set_tags(page, select, names: list[str]) -> None:
    """Make an MLflow multi-select (the chart's params or metrics) hold exactly `names`, in order."""
    remove = select.locator(".du-bois-light-select-selection-item-remove")
    while remove.count():
        remove.first.click()
        page.wait_for_timeout(300)
    for name in names:
        select.click()
        page.keyboard.type(name)  # the select filters its (long) list as you type
        option = page.locator(f'.du-bois-light-select-item-option[title="{name}"]').first
        try:
            option.click(timeout=10_000)
        except Exception:  # noqa: BLE001 - playwright's TimeoutError
            raise SystemExit(f"error: MLflow offers no {name!r} for the chart (a typo in "
                             "--knob/--metrics, or a stage that logged nothing?)") from None
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)


def choose_chart(page, knob: str, metrics: list[str]) -> dict:
    """MLflow's compare-runs page as the README shows it: the parallel-coordinates chart of the
    knob against `metrics` (instead of the first param and metric MLflow picks), the runs'
    details, and only the params that differ; returns the clip ending above the long metrics
    table (the chart's axes already show both runs' values of each metric)."""
    selects = page.locator(".du-bois-light-select")
    _set_tags(page, selects.nth(0), [knob])
    _set_tags(page, selects.nth(1), metrics)
    page.get_by_text("Comparing 2 Runs").click()  # close any open list
    page.get_by_role("switch").first.click()  # Parameters: show diff only
    page.wait_for_timeout(2000)
    heads = [b for b in (h.bounding_box() for h in page.get_by_text("Metrics", exact=True).all())
             if b and b["y"] > 300]
    bottom = min((b["y"] for b in heads), default=page.viewport_size["height"]) - 12
    return {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": bottom}


def shoot(pages: dict[str, str], out: Path, knob: str, metrics: list[str]) -> None:
    """Save each page; the MLflow comparison after choosing its chart (`choose_chart`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for name, url in pages.items():
            tall = name == "mlflow-compare.png"  # chart, run details and the params that differ
            page = browser.new_page(viewport={"width": 1440, "height": 1300 if tall else 900})
            page.goto(url, wait_until="load", timeout=60_000)  # the UIs poll: never network-idle
            page.wait_for_timeout(8000)  # client-side rendering of the fetched runs
            _close_side_panels(page)
            clip = choose_chart(page, knob, metrics) if tall else None
            page.screenshot(path=str(out / name), full_page=False, clip=clip)
            print(f"wrote {out / name}")
            page.close()
        browser.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="params override after SMALL (repeatable)")
    parser.add_argument("--knob", default="prior.steps=10,150",
                        help="NAME=A,B: the param the two runs differ in (default prior.steps=10,150)")
    parser.add_argument("--metrics", default="train_prior/val_loss_image,train_prior/val_loss",
                        help="comma-separated pipeline-run metrics for the chart's axes")
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--stages", default=str(REPO / "stages"), help="stage scripts to run")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    knob = parse_knob(args.knob)
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
        dep_id, runs = asyncio.run(run_twice(deployment, SMALL + args.overrides, knob, args.timeout))
        shoot({"prefect-deployment.png": f"http://127.0.0.1:{pport}/deployments/deployment/{dep_id}",
               "prefect-flow-run.png": f"http://127.0.0.1:{pport}/runs/flow-run/{runs[-1]}",
               "mlflow-compare.png": mlflow_compare_url(f"http://127.0.0.1:{mport}", db)},
              out, knob[0], [m.strip() for m in args.metrics.split(",") if m.strip()])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        print(f"logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
