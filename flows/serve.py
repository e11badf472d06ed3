"""`python -m flows.serve [--params F] [--preset P] [--workdir D] [--stages a,b]`: serve the pipeline
flow as a Prefect deployment with the cron schedule of params `schedule` (cron, timezone,
deployment name); `--stages` makes each scheduled run take only those stages.

Run it from the repo root, with PREFECT_API_URL pointing at a server (`make ui` starts one on
127.0.0.1:4200); the deployment, its schedule and every scheduled or manual run then show in the
Prefect UI. Without PREFECT_API_URL Prefect uses a temporary local server that the UI cannot see.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from pydantic import ValidationError

from dalle.config import load_params
from dalle.config_sections import Schedule
from dalle.errors import ConfigError
from dalle.pipeline import select
from dalle.runner import configure_logging, run_guarded
from flows.pipeline import dalle_pipeline
from flows.tasks import check_prefect_api


def cron_schedule(schedule: Schedule) -> CronSchedule:
    """params `schedule` -> a Prefect cron schedule; a bad cron/timezone is one ConfigError line."""
    try:
        return CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = f"schedule.{err['loc'][0]}" if err.get("loc") else "schedule"
        raise ConfigError(f"{key}: bad value {err.get('input')!r}: {err['msg'].lower()}") from None


def build_deployment(params_file: str = "params.yaml", preset: Optional[str] = None,
                     workdir: Optional[str] = None,
                     stages: Optional[list[str]] = None) -> RunnerDeployment:
    """The deployment of `dalle_pipeline` with its cron schedule and default parameters."""
    params = load_params(params_file, preset)
    select(stages)  # unknown stage names: one line before anything is registered
    schedule = params.schedule
    workdir = str(Path(workdir or ".").resolve())
    return dalle_pipeline.to_deployment(
        name=schedule.deployment,
        schedules=[cron_schedule(schedule)],
        parameters={"params_file": str(Path(params_file).resolve()), "preset": preset,
                    "workdir": workdir, "stages": stages},
        description=f"dalle pipeline on {params_file}"
                    + (f" + preset {preset}" if preset else "") + f" in {workdir}",
        tags=["dalle"],
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows.pipeline.dalle_pipeline
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--workdir", default=".", help="where the stages run (default: here)")
    parser.add_argument("--stages", default=None, help="comma-separated subset, e.g. generate,evaluate")
    args = parser.parse_args(argv)
    configure_logging()

    def go() -> int:
        stages = args.stages.split(",") if args.stages else None
        deployment = build_deployment(args.params, args.preset, args.workdir, stages)
        check_prefect_api()
        serve(deployment)
        return 0

    return int(run_guarded(go) or 0)


if __name__ == "__main__":
    sys.exit(main())
