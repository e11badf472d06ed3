"""Reading tracked runs back: run records and metric histories for `dalle runs compare`, and the
model registry lookup behind `fetch_model` (`models:/NAME@ALIAS` -> a local directory).

Everything goes through the `MlflowClient` made by `dalle.tracking.make_client` (the only module
that imports mlflow), so a dead server is one line here too.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dalle.tracking import TrackingError, default_uri, make_client, mask_uri


@dataclass(frozen=True)
class RunRecord:
    """One run as `dalle runs compare` shows it."""

    run_id: str
    name: str
    status: str
    start_time: int
    kind: str
    stage: str
    params: dict[str, str]
    metrics: dict[str, float]
    end_time: Optional[int] = None  # ms; a pipeline run's is its last stage's end


def search_runs(experiment: str, kind: str = "pipeline", stage: Optional[str] = None,
                max_results: int = 50, uri: Optional[str] = None) -> list[RunRecord]:
    """Runs of `experiment`, newest first: pipeline (parent) runs, or stage runs of `stage`."""
    client = make_client(uri or default_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"experiment {experiment!r} does not exist in {mask_uri(client.tracking_uri)}")
    query = f"tags.`dalle.kind` = '{kind}'" + (f" and tags.`dalle.stage` = '{stage}'" if stage else "")
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=max_results,
                              order_by=["attributes.start_time DESC"])
    return [RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8], r.info.status,
                      r.info.start_time or 0, r.data.tags.get("dalle.kind", ""),
                      r.data.tags.get("dalle.stage", ""), dict(r.data.params),
                      dict(r.data.metrics), r.info.end_time) for r in runs]


def metric_history(run_id: str, key: str, uri: Optional[str] = None) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of one run, by step."""
    client = make_client(uri or default_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _resolve_model(client: Any, uri: str) -> tuple[str, str]:
    """models:/NAME@ALIAS | models:/NAME/VERSION | models:/NAME/latest -> (run_id, artifact path)."""
    body = uri[len("models:/"):]
    name, sep, alias = body.partition("@")
    try:
        if sep and alias.lower() != "latest":
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, ver = (name if sep else body).partition("/")
            if ver in ("", "latest"):
                found = client.search_model_versions(f"name = '{name}'", max_results=1000)
                if not found:
                    raise TrackingError(f"model {name!r} has no registered version")
                version = max(found, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, ver)
    except TrackingError:
        raise
    except Exception:  # noqa: BLE001 - registry says "not found" in many shapes
        raise TrackingError(f"model {uri!r} is not in the registry at "
                            f"{mask_uri(client.tracking_uri)}") from None
    source = version.source or ""
    path = source.split("/", 3)[3] if source.startswith("runs:/") and source.count("/") >= 3 else "model"
    return version.run_id, path


def fetch_model(uri: str, dst: Optional[str | Path] = None, tracking_uri: Optional[str] = None) -> Path:
    """A local directory holding the model's files (safetensors + JSON).

    `uri` is `models:/NAME@ALIAS` (`@latest`: the newest version), `models:/NAME/VERSION`,
    `runs:/RUN_ID/PATH`, or a local file/directory (returned as is).
    """
    if not uri.startswith(("models:/", "runs:/")):
        local = Path(uri)
        if not local.exists():
            raise TrackingError(f"model {uri!r}: no such file, and not a models:/ or runs:/ URI")
        return local
    client = make_client(tracking_uri or default_uri())
    if uri.startswith("models:/"):
        run_id, path = _resolve_model(client, uri)
    else:
        run_id, _, path = uri[len("runs:/"):].partition("/")
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="dalle-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, path or "model", str(dst)))
    except Exception:  # noqa: BLE001
        raise TrackingError(f"model {uri!r}: its files could not be downloaded") from None
