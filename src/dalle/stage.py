"""One declaration per stage: `StageSpec`, and how a declared stage runs.

A stage is declared once, next to its library function (`dalle.train.dvae.STAGE`, ...):

    STAGE = StageSpec("train_dvae", train_dvae, params=("dvae", "seed"),
                      inputs=lambda a: (a.clean, a.raw),
                      outputs=lambda a: (Out(a.dvae), Out(a.metrics("dvae"), metric=True)),
                      summary="the dVAE (§2.1, App. A)")

* `fn(art, tracker, **sections)` receives the artefact catalog, the tracker, and exactly the
  params the spec names, by keyword (`"tokenizer.text_len"` arrives as `text_len=`,
  `"dvae.vocab_size:image_vocab"` as `image_vocab=`): the DVC params of the stage are the
  arguments of the function, nothing more.
* `inputs`/`outputs` name artefacts of the catalog; dvc.yaml (`dalle.dvcgen`) and the DAG that
  Prefect walks (`dalle.pipeline`) are derived from them.
* `stages/<name>.py` only calls `STAGE.main()`; Prefect tasks call `STAGE.run` in-process (or,
  for a stage that spreads over several Horovod ranks, the same `python -m stages.<name>`).
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.config_sections import Params
from dalle.curves import CurveRecorder
from dalle.distributed.launch import relaunch_if_needed, will_relaunch
from dalle.errors import ConfigError
from dalle.io import write_json
from dalle.runner import configure_logging, fail, parse_stage_args, run_guarded
from dalle.speed import matmul_gflops
from dalle.tracking import NullTracker, process_rank, stage_run

StageFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Out:
    """One output of a stage: cached by DVC unless `cache` is False; `metric`: a DVC metrics file."""

    path: Path
    cache: bool = True
    metric: bool = False


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: StageFn
    params: tuple[str, ...]  # dotted params keys, optionally "key:argument_name"
    inputs: Callable[[Artefacts], tuple[Path, ...]]
    outputs: Callable[[Artefacts], tuple[Out, ...]]
    summary: str  # what the stage does, with the paper's section
    distributed: bool = False  # runs on distributed.num_proc Horovod ranks when asked
    preflight: Optional[Callable[[Params], None]] = None  # raises ConfigError before any launch

    def param_keys(self) -> tuple[str, ...]:
        """The dotted params keys (what dvc.yaml lists under `params:`)."""
        return tuple(p.split(":", 1)[0] for p in self.params)

    def arguments(self, params: Params) -> dict[str, Any]:
        """The keyword arguments of `fn`: each named param, by its last key or its alias."""
        out: dict[str, Any] = {}
        for entry in self.params:
            dotted, _, alias = entry.partition(":")
            value: Any = params
            for part in dotted.split("."):
                value = getattr(value, part)
            out[alias or dotted.rsplit(".", 1)[-1]] = value
        return out

    def check(self, params: Params) -> None:
        """The spec's preflight (e.g. the batch divides by distributed.num_proc), before a relaunch
        turns one clear error line into one per rank."""
        if self.preflight is not None:
            self.preflight(params)

    def run(self, params: Params, tracker: Any) -> dict[str, Any]:
        """The stage's work in this process; returns its metrics, with its wall time and the
        machine's reference speed (`dalle.speed`) added to its metrics file on rank 0."""
        before, start = matmul_gflops(), time.perf_counter()
        metrics = self.fn(Artefacts(params.paths), tracker, **self.arguments(params))
        timing = {"stage_seconds": round(time.perf_counter() - start, 2),
                  "reference_matmul_gflops": round((before + matmul_gflops()) / 2, 1)}
        if process_rank() == 0:
            for out in self.outputs(Artefacts(params.paths)):
                if out.metric:  # the stage wrote it; the encode stage's is its returned metrics
                    found = json.loads(out.path.read_text()) if out.path.exists() else metrics
                    write_json(out.path, {**found, **timing})
            tracker.log_metrics(timing)
        return {**(metrics or {}), **timing}

    def main(self, argv: Optional[Sequence[str]] = None) -> Any:
        """`python -m stages.<name> [--params F] [--preset P] [-S k=v]` (what `dvc repro` runs)."""
        configure_logging()
        args = parse_stage_args(self.name, argv)
        params = run_guarded(lambda: load_params(args.params, args.preset, args.overrides))
        run_guarded(lambda: self.check(params))
        if self.distributed and will_relaunch(params.distributed):
            self._relaunch(params, list(sys.argv[1:] if argv is None else argv))

        def go() -> Any:
            with tracked(self.name, params) as tracker:
                return self.run(params, tracker)

        return run_guarded(go)

    def _relaunch(self, params: Params, argv: list[str]) -> None:
        """Re-run this very command under horovodrun on num_proc ranks and exit with its status
        (rank 0 of the job opens the stage's MLflow run)."""
        code = run_guarded(lambda: relaunch_if_needed(params.distributed, f"stages.{self.name}", argv))
        if code:
            fail(f"distributed stage {self.name} failed: horovodrun exited with status {code} "
                 "(the failing rank's output is above)", code=code)
        raise SystemExit(0)


@contextlib.contextmanager
def tracked(stage: str, params: Params) -> Iterator[NullTracker]:
    """The stage's MLflow run (a child of the pipeline's run; none when tracking is off or on
    ranks other than 0); on rank 0 every metric logged with a step is also kept as the DVC plots
    file `metrics/curves/<stage>.json`, written when the stage succeeds."""
    with stage_run(stage, params) as tracker:
        if process_rank() != 0:
            yield tracker
            return
        art = Artefacts(params.paths)
        recorder = CurveRecorder(tracker, journal=art.curves_journal(stage))
        yield recorder
        recorder.write(art.curves(stage))


def require(path: Path, what: str, stage: str) -> Path:
    """`path` if it exists, else one ConfigError line naming the stage that makes it."""
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}; run the {stage} stage first "
                          f"(dvc repro {stage})")
    return path
