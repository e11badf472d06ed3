"""MLflow tracking: the only module that imports mlflow.

One MLflow run per stage, a child of one parent run per pipeline run (a `dvc repro`, a Prefect
flow run, a `make repro`), tagged with the stage name, git commit, params hash and pipeline id.
Library code receives a `Tracker` and never sees mlflow; `NullTracker` is used when tracking is
off (params `tracking.enabled: false`) and on every Horovod rank but 0. The client API
(`MlflowClient`) is used throughout because the fluent API keeps global state that is not safe
across threads (Prefect task runners).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlparse

from dalle.config import REPO_ROOT, flatten, params_hash
from dalle.errors import DalleError

PIPELINE_ENV = "DALLE_PIPELINE_ID"
_MAX_PARAM_LEN = 6000


class TrackingError(DalleError):
    """The tracking server cannot be reached or refused a request."""


def mask_uri(uri: str) -> str:
    """Hide credentials in a URI for logs: http://user:secret@host -> http://***@host."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", uri)


def default_uri(configured: Optional[str] = None) -> str:
    """MLFLOW_TRACKING_URI env > params tracking.uri > sqlite:///<abs repo root>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(REPO_ROOT / 'mlflow.db').resolve()}"


def process_rank() -> int:
    """Horovod/MPI/torchrun rank of this process (0 when not distributed)."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dvc_ancestor_id() -> Optional[str]:
    """Id of the `dvc repro`/`dvc exp run` process this stage runs under (pid + start time)."""
    pid = os.getppid()
    for _ in range(8):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if re.search(r"(^|/|\s)dvc(\s|$)", cmd):
            return f"dvc-{pid}-{stat[19]}"
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None


def pipeline_id() -> str:
    """The id that groups one pipeline run's stages: env, else the dvc ancestor, else new."""
    value = os.environ.get(PIPELINE_ENV) or _dvc_ancestor_id()
    if not value:
        value = f"adhoc-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        os.environ[PIPELINE_ENV] = value
    return value


class NullTracker:
    """Does nothing; the tracker used when tracking is off or on non-zero ranks."""

    run_id: Optional[str] = None
    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, subdir: Optional[str] = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def register_model(self, name: str, files: list[str | Path], description: str = "") -> None: ...


class MlflowTracker(NullTracker):
    """Logs one run through MlflowClient (thread-safe; no fluent global state)."""

    enabled = True

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                 for k, v in flatten(dict(params)).items()]
        items = [Param(p.key, p.value[:_MAX_PARAM_LEN]) for p in items]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, subdir: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), subdir or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), subdir)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def register_model(self, name: str, files: list[str | Path], description: str = "") -> None:
        """Log files under `model/` and register them as a new version aliased `latest`."""
        for f in files:
            self.log_artifact(f, "model")
        source = f"runs:/{self.run_id}/model"
        with contextlib.suppress(Exception):
            self.client.create_registered_model(name, description=description)
        version = self.client.create_model_version(name, source, run_id=self.run_id)
        self.client.set_registered_model_alias(name, "latest", version.version)


def _check_reachable(uri: str, timeout: float = 3.0) -> None:
    parsed = urlparse(uri)
    if parsed.scheme not in {"http", "https"}:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingError(f"MLflow server {mask_uri(uri)} is not reachable ({exc.strerror or exc}); "
                            "unset MLFLOW_TRACKING_URI to use the embedded sqlite store, or set "
                            "tracking.enabled: false") from None


def make_client(uri: str) -> Any:
    _check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _parent_run(client: Any, exp_id: str, pid: str, tags: Mapping[str, str]) -> str:
    """Find or create the pipeline's parent run (by tag), so every stage nests under it."""
    query = f"tags.`dalle.pipeline_id` = '{pid}' and tags.`dalle.kind` = 'pipeline'"
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline {pid}",
                            tags={**tags, "dalle.kind": "pipeline", "dalle.pipeline_id": pid})
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Any, rank: Optional[int] = None) -> Iterator[NullTracker]:
    """Context for one stage: yields a tracker (Null when off or rank != 0) and ends the run.

    `params` is the full `dalle.config.Params`; all of it is logged (dotted names) so runs can be
    compared on any knob, and its hash is a tag.
    """
    rank = process_rank() if rank is None else rank
    tracking = params.tracking
    if not tracking.enabled or rank != 0:
        yield NullTracker()
        return
    uri = default_uri(tracking.uri)
    client = make_client(uri)
    exp_id = _experiment_id(client, tracking.experiment)
    pid = pipeline_id()
    tags = {"dalle.stage": stage, "dalle.git_commit": git_commit(),
            "dalle.params_hash": params_hash(params), "dalle.pipeline_id": pid}
    parent = _parent_run(client, exp_id, pid, {k: v for k, v in tags.items() if k != "dalle.stage"})
    run = client.create_run(exp_id, run_name=stage,
                            tags={**tags, "dalle.kind": "stage", "mlflow.parentRunId": parent})
    tracker = MlflowTracker(client, run.info.run_id)
    tracker.log_params(params.model_dump(mode="json"))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)


def log_json_artifact(tracker: NullTracker, obj: Any, name: str) -> None:
    """Convenience for trackers: write obj to a temp JSON file and log it."""
    if not tracker.enabled:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        tracker.log_artifact(path)
