"""The DAG: every declared stage in order, the edges derived from their artefacts, and running one
stage for the Prefect flow.

`STAGES` lists the `StageSpec` each stage module declares (`dalle.stage`). Stage B depends on
stage A when one of B's inputs is (or lies inside, or contains) one of A's outputs in the
artefact catalog; nothing else states the edges. dvc.yaml is generated from the same specs
(`dalle.dvcgen`, `dalle dvc-yaml`), and `flows/pipeline.py` walks `STAGES` in this order.

A Prefect task runs `spec.run` in its own process, inside the same tracking context as
`python -m stages.<name>`; a stage that would spread over several Horovod ranks
(`distributed.num_proc > 1`) is run as that very command instead, which relaunches itself under
horovodrun; its rank 0 opens the stage's MLflow run under the same parent (DALLE_PIPELINE_ID).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from dalle.catalog import Artefacts, template
from dalle.config_sections import Params
from dalle.data.collect import STAGE as COLLECT
from dalle.data.dedup import STAGE as DEDUP
from dalle.data.prepare import STAGE as PREPARE
from dalle.data.tokenizer import STAGE as TOKENIZER
from dalle.distributed.launch import stage_command, will_relaunch
from dalle.errors import ConfigError, DalleError
from dalle.eval.evaluate import STAGE as EVALUATE
from dalle.generate import STAGE as GENERATE
from dalle.io import read_json
from dalle.stage import StageSpec, tracked
from dalle.tokens import STAGE as ENCODE
from dalle.tracking import latest_stage_run
from dalle.train.clip import STAGE as TRAIN_CLIP
from dalle.train.dvae import STAGE as TRAIN_DVAE
from dalle.train.prior import STAGE as TRAIN_PRIOR

STAGES: tuple[StageSpec, ...] = (COLLECT, DEDUP, PREPARE, TOKENIZER, TRAIN_DVAE, ENCODE,
                                 TRAIN_PRIOR, TRAIN_CLIP, GENERATE, EVALUATE)
BY_NAME = {s.name: s for s in STAGES}


class StageFailed(DalleError):
    """A stage run as its own process (several Horovod ranks) exited non-zero."""


def _within(a: str, b: str) -> bool:
    """Whether path a is b or lies inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def upstream(spec: StageSpec, art: Optional[Artefacts] = None) -> tuple[str, ...]:
    """The stages whose outputs `spec` reads, in DAG order."""
    art = art or template()
    reads = [str(p) for p in spec.inputs(art)]
    found = []
    for other in STAGES:
        if other is spec:
            break
        writes = [str(o.path) for o in other.outputs(art)]
        if any(_within(r, w) or _within(w, r) for r in reads for w in writes):
            found.append(other.name)
    return tuple(found)


def descendants(name: str) -> set[str]:
    """`name` and every stage downstream of it."""
    found = {name}
    for spec in STAGES:
        if set(upstream(spec)) & found:
            found.add(spec.name)
    return found


def select(names: Optional[Sequence[str]]) -> list[StageSpec]:
    """The stages to run, in DAG order: `names` (validated) or all of them."""
    if not names:
        return list(STAGES)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; stages: {', '.join(BY_NAME)}")
    return [s for s in STAGES if s.name in names]


def json_safe(value: Any) -> Any:
    """Metrics for Prefect results: plain JSON types only (never tensors or arrays)."""
    try:
        return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item")
                                     else str(o)))
    except (TypeError, ValueError):
        return str(value)


def run_stage(name: str, params: Params, params_file: str = "params.yaml",
              preset: Optional[str] = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run one stage tracked like `python -m stages.<name>` (`params` = load_params(params_file,
    preset, overrides)); returns {"stage", "metrics", "outs", "mlflow_run_id"}."""
    spec = select([name])[0]
    outs = [str(o.path) for o in spec.outputs(Artefacts(params.paths))]
    spec.check(params)
    if spec.distributed and will_relaunch(params.distributed):
        metrics, run_id = _run_stage_process(spec, params, params_file, preset, overrides)
    else:
        with tracked(name, params) as tracker:
            metrics = spec.run(params, tracker)
            run_id = tracker.run_id
    return {"stage": name, "metrics": json_safe(metrics if isinstance(metrics, dict) else {}),
            "outs": outs, "mlflow_run_id": run_id}


def _run_stage_process(spec: StageSpec, params: Params, params_file: str, preset: Optional[str],
                       overrides: Sequence[str]) -> tuple[dict[str, Any], Optional[str]]:
    """`python -m stages.<name> ...` as a child (it inherits DALLE_PIPELINE_ID, so its rank 0
    tracks under this pipeline's parent run); its metrics file and MLflow run id."""
    cmd = stage_command(spec.name, params_file, preset, overrides)
    started = int(time.time() * 1000)
    code = subprocess.run(cmd, env=dict(os.environ)).returncode
    if code:
        raise StageFailed(f"stage {spec.name} on {params.distributed.num_proc} processes failed: "
                          f"`python -m stages.{spec.name}` exited with status {code} (its output "
                          "is above)")
    art = Artefacts(params.paths)
    files = [o.path for o in spec.outputs(art) if o.metric]
    metrics = read_json(files[0]) if files and Path(files[0]).is_file() else {}
    return metrics, latest_stage_run(params, spec.name, since_ms=started)
