"""MLflow tracking: the only module that imports mlflow.

One MLflow run per stage, a child of one parent run per pipeline run (a `dvc repro`, a Prefect
flow run, a `make repro`), tagged with the stage name, git commit, params hash and pipeline id.
Each stage's final metrics are copied onto the parent as `<stage>/<metric>` so pipeline runs can
be compared side by side. Library code receives a `Tracker` and never sees mlflow; `NullTracker`
is used when tracking is off (`tracking.enabled: false`) and on every Horovod rank but 0. The
client API (`MlflowClient`) is used throughout: the fluent API keeps global state that is not
safe across threads (Prefect task runners). Writes retry on sqlite "database is locked".
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

from dalle.config import REPO_ROOT, flatten, params_hash
from dalle.errors import DalleError
from dalle.runner import is_interrupt
from dalle.tracking_store import (HTTP_LIMITS, TrackingError, probe_http, check_store,
                                  mask_uri, store_errors)

PIPELINE_ENV = "DALLE_PIPELINE_ID"
GOOD_ALIAS = "good"  # MLflow reserves the alias `latest`; `models:/NAME/latest` is the newest version
_MAX_PARAM_LEN = 6000
T = TypeVar("T")
log = logging.getLogger(__name__)


def original_root(root: Path = REPO_ROOT) -> Path:
    """The user's repo even inside a `dvc exp run --temp/--queue` copy (<repo>/.dvc/tmp/exps/...)."""
    parts = root.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root.resolve()


def default_uri(configured: Optional[str] = None) -> str:
    """MLFLOW_TRACKING_URI env > params tracking.uri > sqlite:///<abs original repo>/mlflow.db.

    Under the test suite (DALLE_TEST=1) the fallback is a temp-dir database, never the repo's.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    if os.environ.get("DALLE_TEST"):
        return f"sqlite:///{Path(tempfile.gettempdir()) / 'dalle-test-mlflow.db'}"
    return f"sqlite:///{original_root() / 'mlflow.db'}"


def artifact_root(uri: str) -> Optional[str]:
    """For a sqlite store: <db dir>/mlartifacts (absolute), so temp copies log to one place."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


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


def retry_locked(fn: Callable[[], T], attempts: int = 8, delay: float = 0.2) -> T:
    """Call fn, retrying with backoff while sqlite says the database is locked/busy."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only lock errors are retried
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay * 2 ** attempt)
    raise AssertionError("unreachable")


class NullTracker:
    """Does nothing; the tracker used when tracking is off or on non-zero ranks."""

    run_id: Optional[str] = None
    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, subdir: Optional[str] = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def register_model(self, name: str, files: list[str | Path], description: str = "",
                       good: bool = True) -> Optional[str]: ...


class MlflowTracker(NullTracker):
    """Logs one run through MlflowClient (thread-safe; no fluent global state)."""

    enabled = True
    broken: Optional[str] = None  # why the store stopped answering mid-run

    def __init__(self, client: Any, run_id: str, register: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.register = register

    def guarded(self, write: Callable[[], Any], always: bool = False) -> Any:
        """Run one write to the store; if the store fails mid-run, warn once and log nothing more
        (the stage's outputs and metrics files matter more than its record)."""
        if self.broken is not None and not always:
            return None
        try:
            return write()
        except Exception as exc:  # noqa: BLE001 - any store failure
            if self.broken is None:
                self.broken = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
                log.warning("MLflow store stopped accepting writes (%s); run %s continues "
                            "untracked", mask_uri(self.broken), self.run_id)
            return None

    def log_params(self, params: Mapping[str, Any], strict: bool = False) -> None:
        from mlflow.entities import Param

        items = [Param(k, mask_uri(v if isinstance(v, str) else json.dumps(v))[:_MAX_PARAM_LEN])
                 for k, v in flatten(dict(params)).items()]  # no credentials of a URI in params
        for start in range(0, len(items), 100):
            batch = items[start:start + 100]
            write = lambda b=batch: retry_locked(lambda: self.client.log_batch(self.run_id, params=b))  # noqa: E731
            write() if strict else self.guarded(write)

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self.guarded(lambda: retry_locked(lambda: self.client.log_batch(self.run_id,
                                                                            metrics=items)))

    def log_artifact(self, path: str | Path, subdir: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.guarded(lambda: self.client.log_artifacts(self.run_id, str(path),
                                                           subdir or path.name))
        elif path.is_file():
            self.guarded(lambda: self.client.log_artifact(self.run_id, str(path), subdir))

    def log_dict(self, obj: Any, name: str) -> None:
        self.guarded(lambda: self.client.log_dict(self.run_id, obj, name))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.guarded(lambda k=key, v=value: retry_locked(
                lambda: self.client.set_tag(self.run_id, k, str(v))))

    def register_model(self, name: str, files: list[str | Path], description: str = "",
                       good: bool = True) -> Optional[str]:
        """Log files (safetensors + config JSON) under `model/`, register them as a new version of
        `name`, and point the alias `good` at it when `good` (e.g. its loss was finite)."""
        if not self.register:
            return None
        missing = [str(f) for f in files if not Path(f).exists()]
        if missing:
            raise TrackingError(f"cannot register model {name!r}: {missing[0]} does not exist")
        for f in files:
            self.log_artifact(f, "model")
        return self.guarded(lambda: self._register(name, description, good))

    def _register(self, name: str, description: str, good: bool) -> str:
        with contextlib.suppress(Exception):  # exists already (or created concurrently)
            self.client.create_registered_model(name, description=description)
        version = retry_locked(lambda: self.client.create_model_version(
            name, f"runs:/{self.run_id}/model", run_id=self.run_id,
            tags={"dalle.good": str(good).lower()}))
        if good:
            self.client.set_registered_model_alias(name, GOOD_ALIAS, version.version)
        return str(version.version)


def check_reachable(configured: Optional[str] = None) -> str:
    """The tracking URI that would be used; raises TrackingError at once if it is a dead server."""
    uri = default_uri(configured)
    probe_http(uri)
    return uri


def make_client(uri: str, write: bool = False) -> Any:
    check_store(uri, write)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO chatter on stderr
    for var, value in HTTP_LIMITS.items():  # a server that errs or stalls: seconds, not minutes
        os.environ.setdefault(var, value)
    if write and uri.startswith("sqlite:///"):
        _create_sqlite(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _create_sqlite(uri: str) -> None:
    """A new sqlite store is made under a temporary name and linked into place when complete:
    a kill while MLflow creates its tables (seconds) never leaves a half-made store that every
    later run would refuse. Two processes creating it at once: the first link wins."""
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from dalle.io import tmp_sibling  # (here: torch is not imported for every tracking use)

    tmp = tmp_sibling(path)
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root(uri))
        store.engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
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
        if found[0].info.status != "RUNNING":
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline {pid}",
                            tags={**tags, "dalle.kind": "pipeline", "dalle.pipeline_id": pid})
    # Two stages may race to create it: all keep the oldest, the loser deletes its own.
    oldest = client.search_runs([exp_id], filter_string=query, max_results=1,
                                order_by=["attributes.start_time ASC"])[0].info.run_id
    if oldest != run.info.run_id:
        client.delete_run(run.info.run_id)
    return oldest


@dataclass
class PipelineRun:
    """The parent run of one pipeline run (what Prefect links to)."""

    client: Any
    run_id: str
    experiment_id: str
    uri: str
    stages: list[str] = field(default_factory=list)

    def link(self) -> str:
        """A URL for the MLflow UI when served over http, else the run's id path."""
        base = self.uri.rstrip("/") if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def open_pipeline(params: Any, pid: Optional[str] = None) -> Optional[PipelineRun]:
    """Create (or find) the parent run for pipeline `pid` and log the params on it."""
    tracking = params.tracking
    if not tracking.enabled or process_rank() != 0:
        return None
    uri = default_uri(tracking.uri)
    with store_errors(uri):
        client = make_client(uri, write=True)
        exp_id = _experiment_id(client, tracking.experiment, uri)
        pid = pid or pipeline_id()
        tags = {"dalle.git_commit": git_commit(), "dalle.params_hash": params_hash(params)}
        run_id = _parent_run(client, exp_id, pid, {**tags, "dalle.pipeline_id": pid})
    with contextlib.suppress(Exception):  # same params already logged by an earlier stage
        MlflowTracker(client, run_id).log_params(params.model_dump(mode="json"))
    return PipelineRun(client, run_id, exp_id, uri)


def _copy_final_metrics(client: Any, child: str, parent: str, stage: str) -> None:
    metrics = client.get_run(child).data.metrics
    MlflowTracker(client, parent).log_metrics({f"{stage}/{k}": v for k, v in metrics.items()})


def latest_stage_run(params: Any, stage: str, since_ms: int = 0) -> Optional[str]:
    """The id of this pipeline's newest `stage` run started at or after `since_ms` (a stage that
    ran in another process, e.g. under horovodrun), or None when tracking is off/none found."""
    if not params.tracking.enabled:
        return None
    client = make_client(default_uri(params.tracking.uri))
    exp = client.get_experiment_by_name(params.tracking.experiment)
    query = (f"tags.`dalle.kind` = 'stage' and tags.`dalle.stage` = '{stage}' and "
             f"tags.`dalle.pipeline_id` = '{pipeline_id()}' and attributes.start_time >= {since_ms}")
    found = client.search_runs([exp.experiment_id], filter_string=query, max_results=1,
                               order_by=["attributes.start_time DESC"]) if exp else []
    return found[0].info.run_id if found else None


@contextlib.contextmanager
def stage_run(stage: str, params: Any, rank: Optional[int] = None) -> Iterator[NullTracker]:
    """Context for one stage: yields a tracker (Null when off or rank != 0) and ends the run.

    `params` is the full `dalle.config.Params`; all of it is logged (dotted names) so runs can be
    compared on any knob, and its hash is a tag. A store that cannot be used fails here, before
    any work, in one line (TrackingError); one that fails later costs a warning, not the stage
    (`MlflowTracker`). The stage and parent runs end FINISHED, FAILED, or KILLED when SIGTERM or
    SIGINT stopped the stage (dalle.runner)."""
    rank = process_rank() if rank is None else rank
    if not params.tracking.enabled or rank != 0:
        yield NullTracker()
        return
    pipe = open_pipeline(params)
    assert pipe is not None
    client = pipe.client
    tags = {"dalle.stage": stage, "dalle.git_commit": git_commit(), "dalle.kind": "stage",
            "dalle.params_hash": params_hash(params), "dalle.pipeline_id": pipeline_id(),
            "mlflow.parentRunId": pipe.run_id}
    with store_errors(pipe.uri):
        run = retry_locked(lambda: client.create_run(pipe.experiment_id, run_name=stage, tags=tags))
        tracker = MlflowTracker(client, run.info.run_id, params.tracking.register_models)
        tracker.log_params(params.model_dump(mode="json"), strict=True)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
        tracker.guarded(lambda: _copy_final_metrics(client, run.info.run_id, pipe.run_id, stage))
    except BaseException as exc:
        status = "KILLED" if is_interrupt(exc) else "FAILED"
        raise
    finally:
        for run_id in (run.info.run_id, pipe.run_id):
            tracker.guarded(lambda rid=run_id: retry_locked(
                lambda: client.set_terminated(rid, status=status)), always=True)
