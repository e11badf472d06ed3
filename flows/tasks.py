"""Prefect tasks: each wraps `dalle.pipeline.run_stage`, the same body `stages/<name>.py` runs.

Tasks take the params file/preset/overrides (strings), not a config object, so the Prefect UI
shows what each run used; they return plain JSON (stage, metrics, output paths, MLflow run id),
never tensors. Nothing is cached (NO_CACHE): DVC owns caching, and a Prefect cache keyed on task
inputs would hide changed data files. `collect` may touch the network, so it retries with
exponential backoff.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from dalle.config import load_params
from dalle.errors import DalleError
from dalle.pipeline import run_stage
from dalle.tracking import mask_uri


class PrefectUnreachable(DalleError):
    """PREFECT_API_URL names a server that does not answer."""


def check_prefect_api(timeout: float = 3.0) -> Optional[str]:
    """When PREFECT_API_URL is set, GET <api>/health quickly; a dead server is one line, not a hang."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            json.loads(resp.read() or b"true")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise PrefectUnreachable(f"Prefect server {mask_uri(url)} is not reachable ({reason}); unset "
                                 "PREFECT_API_URL to run on a temporary local server, or start "
                                 "one with `make ui`") from None
    return url


def _run(stage: str, params_file: str, preset: Optional[str], overrides: list[str]) -> dict[str, Any]:
    params = load_params(params_file, preset, overrides)
    return run_stage(stage, params, params_file, preset, overrides)  # num_proc > 1: subprocess


stage_task = task(_run, name="stage", cache_policy=NO_CACHE, task_run_name="{stage}")
collect_task = task(_run, name="collect", cache_policy=NO_CACHE, task_run_name="collect",
                    retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                    retry_jitter_factor=0.5)


def task_for(stage: str):  # -> prefect Task
    """The task that runs `stage`: `collect` retries with backoff, the others fail fast."""
    if stage == "collect":
        return collect_task
    return stage_task.with_options(name=stage)
