"""The DAG of DESIGN.md §4 as data, and running one stage in-process.

`dvc.yaml` declares the same DAG for DVC (a unit test keeps the two in step); the Prefect flow
(`flows/pipeline.py`) walks `STAGES` in order. Neither repeats what a stage does: `stage_body`
takes the body that `stages/<name>.py` hands to `dalle.runner.stage_main` (the script is executed
as `__main__` with `stage_main` swapped for a recorder), so a flow task runs exactly the library
call that `dvc repro` runs. A stage that would spread over several processes
(`distributed.num_proc > 1`) is not run in-process: `run_stage` runs the very command `dvc repro`
runs (`python -m stages.<name> --params F ...`) as a subprocess, which relaunches itself under
horovodrun; its rank 0 opens the stage's MLflow run under the same parent (DALLE_PIPELINE_ID).
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dalle.config_sections import Params, Paths
from dalle.errors import ConfigError, DalleError

StageBody = Callable[[Params, Any], Any]


class StageFailed(DalleError):
    """A stage run as its own process (several Horovod ranks) exited non-zero."""


@dataclass(frozen=True)
class StageSpec:
    """One node of the DAG: its upstream stages and the outputs it leaves (relative paths)."""

    name: str
    upstream: tuple[str, ...]
    outs: Callable[[Paths], tuple[str, ...]]
    metrics: Optional[str] = None  # metrics/<file>.json written by the stage, if any


STAGES: tuple[StageSpec, ...] = (
    StageSpec("collect", (), lambda p: (p.raw,), "collect.json"),
    StageSpec("dedup", ("collect",), lambda p: (p.clean,), "dedup.json"),
    StageSpec("tokenizer", ("dedup",), lambda p: (f"{p.models}/tokenizer.json",), "tokenizer.json"),
    StageSpec("train_dvae", ("dedup",),
              lambda p: (f"{p.models}/dvae.safetensors", f"{p.models}/dvae.json"), "dvae.json"),
    StageSpec("encode", ("tokenizer", "train_dvae"), lambda p: (p.tokens,)),
    StageSpec("train_prior", ("encode",),
              lambda p: (f"{p.models}/prior.safetensors", f"{p.models}/prior.json"), "prior.json"),
    StageSpec("train_clip", ("tokenizer",),
              lambda p: (f"{p.models}/clip.safetensors", f"{p.models}/clip.json"), "clip.json"),
    StageSpec("generate", ("train_prior", "train_clip"), lambda p: (p.samples,), "generate.json"),
    StageSpec("evaluate", ("generate",), lambda p: tuple(
        f"{p.plots}/{n}.json" for n in ("fid_blur", "fid_rerank", "oracle_rerank")), "eval.json"),
)
BY_NAME = {s.name: s for s in STAGES}
_capture_lock = threading.Lock()


def stage_script(name: str, root: Optional[Path] = None) -> Path:
    root = root or Path.cwd()
    return root / "stages" / f"{name}.py"


def available(root: Optional[Path] = None) -> list[StageSpec]:
    """The stages whose script exists (the DAG grows as stages land)."""
    return [s for s in STAGES if stage_script(s.name, root).is_file()]


def select(names: Optional[list[str]], root: Optional[Path] = None) -> list[StageSpec]:
    """The stages to run, in DAG order: `names` (validated) or every available stage."""
    if not names:
        return available(root)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; stages: {', '.join(BY_NAME)}")
    return [s for s in STAGES if s.name in names]


def stage_body(name: str) -> StageBody:
    """The `body(params, tracker)` that `./stages/<name>.py` passes to `stage_main`."""
    import dalle.runner as runner
    from dalle.distributed.launch import capturing_body

    script = stage_script(name)
    if not script.is_file():
        raise ConfigError(f"stage {name!r} has no script {script}")
    captured: dict[str, StageBody] = {}

    def record(stage: str, body: StageBody, *args: Any, **kwargs: Any) -> None:
        captured[stage] = body

    with _capture_lock:  # stage_main is swapped process-wide for the duration of the import
        original, argv = runner.stage_main, sys.argv
        runner.stage_main, sys.argv = record, [f"stages/{name}.py"]
        try:
            with capturing_body():  # relaunch_stage must not act on the flow's argv/params.yaml
                runpy.run_path(str(script), run_name="__main__")
        except SystemExit:
            pass  # scripts may end with sys.exit(main())
        finally:
            runner.stage_main, sys.argv = original, argv
    if name not in captured:
        raise ConfigError(f"stages/{name}.py does not call stage_main({name!r}, body)")
    return captured[name]


def json_safe(value: Any) -> Any:
    """Metrics/paths for Prefect results: plain JSON types only (never tensors or arrays)."""
    try:
        return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item")
                                     else str(o)))
    except (TypeError, ValueError):
        return str(value)


def run_stage(name: str, params: Params, params_file: str = "params.yaml",
              preset: Optional[str] = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run one stage tracked like `python -m stages.<name>` (`params` = load_params(params_file,
    preset, overrides)); return {"stage", "metrics", "outs", "mlflow_run_id"}. In this process,
    unless the stage would relaunch itself on several ranks (then as `stage_command`)."""
    from dalle.distributed.launch import will_relaunch

    spec = BY_NAME.get(name)
    outs = list(spec.outs(params.paths)) if spec else []
    if will_relaunch(params.distributed):
        metrics, run_id = _run_stage_process(name, params, params_file, preset, overrides)
        return {"stage": name, "metrics": json_safe(metrics), "outs": outs, "mlflow_run_id": run_id}
    from dalle.tracking import stage_run

    body = stage_body(name)
    with stage_run(name, params) as tracker:
        result = body(params, tracker)
        run_id = tracker.run_id
    metrics = result if isinstance(result, dict) else {}
    return {"stage": name, "metrics": json_safe(metrics), "outs": outs, "mlflow_run_id": run_id}


def _run_stage_process(name: str, params: Params, params_file: str, preset: Optional[str],
                       overrides: Sequence[str]) -> tuple[dict[str, Any], Optional[str]]:
    """`python -m stages.<name> ...` as a child (it inherits DALLE_PIPELINE_ID, so its rank 0
    tracks under this pipeline's parent run); its metrics file and MLflow run id."""
    from dalle.distributed.launch import stage_command
    from dalle.io import read_json
    from dalle.tracking import latest_stage_run

    cmd = stage_command(name, params_file, preset, overrides)
    started = int(time.time() * 1000)
    code = subprocess.run(cmd, env=dict(os.environ)).returncode
    if code:
        raise StageFailed(f"stage {name} on {params.distributed.num_proc} processes failed: "
                          f"`python -m stages.{name}` exited with status {code} (its output is above)")
    spec = BY_NAME.get(name)
    path = Path(params.paths.metrics) / spec.metrics if spec and spec.metrics else None
    metrics = read_json(path) if path is not None and path.is_file() else {}
    return metrics, latest_stage_run(params, name, since_ms=started)
