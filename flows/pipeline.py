"""The whole DAG as one Prefect flow: `python -m flows.pipeline [--params F] [--preset P] [-S k=v]`.

One flow run = one MLflow parent run (DALLE_PIPELINE_ID = prefect-<flow run id>) with a child run
per stage. Stages run in DAG order (`dalle.pipeline.STAGES`, the order dvc.yaml declares) through
tasks that wrap the same library bodies as `stages/*.py`. Each run leaves two Prefect artifacts:
a markdown summary (metrics per stage, link to the MLflow run) and a table of eval metrics.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from dalle.config import load_params
from dalle.pipeline import select
from dalle.runner import configure_logging, run_guarded
from dalle.tracking import PIPELINE_ENV, check_reachable, open_pipeline
from flows.tasks import check_prefect_api, task_for

FLOW_NAME = "dalle-pipeline"


@contextlib.contextmanager
def library_logs_to_prefect() -> Iterator[None]:
    """While the flow runs, the `dalle.*` records of this process also go to the run's Prefect
    log, which the UI shows: the `dalle` logger gets the API log handler Prefect gives its own
    run loggers (what PREFECT_LOGGING_EXTRA_LOGGERS does, for this flow's duration only)."""
    library = logging.getLogger("dalle")
    level = library.level
    added = [h for h in logging.getLogger("prefect.flow_runs").handlers if h not in library.handlers]
    if level == logging.NOTSET:  # Prefect's root logger stops at WARNING
        library.setLevel(os.environ.get("DALLE_LOG_LEVEL", "INFO").upper())
    for handler in added:
        library.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            library.removeHandler(handler)
        library.setLevel(level)


@contextlib.contextmanager
def _in_workdir(workdir: Optional[str], pid: str) -> Iterator[None]:
    """cd into the repo the params refer to and tag the stages with this flow run's id."""
    old_cwd, old_pid = Path.cwd(), os.environ.get(PIPELINE_ENV)
    os.environ[PIPELINE_ENV] = pid
    if workdir:
        os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_pid is None:
            os.environ.pop(PIPELINE_ENV, None)
        else:
            os.environ[PIPELINE_ENV] = old_pid


def summary_markdown(results: list[dict[str, Any]], mlflow_link: Optional[str]) -> str:
    """Key metrics per stage as a markdown table, with the MLflow link on top."""
    lines = ["# dalle pipeline run", ""]
    lines += [f"MLflow parent run: [{mlflow_link}]({mlflow_link})", ""] if mlflow_link else [
        "MLflow tracking was off for this run.", ""]
    lines += ["| stage | metric | value |", "|---|---|---|"]
    for res in results:
        scalars = {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
        for key, value in list(scalars.items())[:12] or [("-", "")]:
            shown = f"{value:.5g}" if isinstance(value, float) else value
            lines.append(f"| {res['stage']} | {key} | {shown} |")
    return "\n".join(lines) + "\n"


def eval_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows `metric, value` of the evaluate stage (every stage's scalars if it did not run)."""
    chosen = [r for r in results if r["stage"] == "evaluate"] or results
    return [{"stage": r["stage"], "metric": k, "value": v} for r in chosen
            for k, v in r["metrics"].items() if isinstance(v, (int, float))]


@flow(name=FLOW_NAME, log_prints=True)
def dalle_pipeline(params_file: str = "params.yaml", preset: Optional[str] = None,
                   overrides: Optional[list[str]] = None, stages: Optional[list[str]] = None,
                   workdir: Optional[str] = None) -> list[dict[str, Any]]:
    """Run the DAG (or `stages`) on `params_file` (+ `preset`, `overrides`) in `workdir`."""
    overrides = list(overrides or [])
    pid = f"prefect-{flow_run.get_id() or 'local'}"
    with _in_workdir(workdir, pid), library_logs_to_prefect():
        params = load_params(params_file, preset, overrides)
        parent = open_pipeline(params, pid)
        results = []
        for spec in select(stages):
            print(f"stage {spec.name} ...")
            results.append(task_for(spec.name)(spec.name, params_file, preset, overrides))
    link = parent.link() if parent else None
    create_markdown_artifact(summary_markdown(results, link), key="dalle-summary",
                             description="key metrics of this pipeline run")
    rows = eval_table(results)
    if rows:
        create_table_artifact(rows, key="dalle-eval-metrics", description="evaluation metrics")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stages", default=None, help="comma-separated subset, e.g. collect,dedup")
    args = parser.parse_args(argv)
    configure_logging()

    def go() -> int:
        params = load_params(args.params, args.preset, args.overrides)  # bad params: one line
        if params.tracking.enabled:
            check_reachable(params.tracking.uri)
        check_prefect_api()
        stages = args.stages.split(",") if args.stages else None
        select(stages)  # unknown stage names: one line before Prefect starts
        dalle_pipeline(args.params, args.preset, args.overrides, stages)
        return 0

    return int(run_guarded(go) or 0)


if __name__ == "__main__":
    sys.exit(main())
