"""Stand-in stages for the flow tests: real `StageSpec`s with tiny bodies (log a metric curve and a
`dalle.*` log line, write a marker), put in place of the DAG's, so orchestration is tested without
training anything."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dalle import pipeline
from dalle.stage import Out, StageSpec

NAMES = ("collect", "dedup", "evaluate")


def _body(name: str):  # noqa: ANN202
    def fn(art: Any, tracker: Any, prior: Any) -> dict[str, Any]:
        flaky = Path("collect.flaky")
        if name == "collect" and flaky.exists():
            flaky.unlink()
            raise ConnectionError("transient network error")
        with open("order.log", "a") as fh:
            fh.write(f"{name}\n")
        logging.getLogger(f"dalle.standin.{name}").info("stand-in %s ran", name)
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        return {"loss": 1 / 3, "n_layers": prior.n_layers, "seen": name}
    return fn


def standin_specs() -> tuple[StageSpec, ...]:
    outs = {"collect": lambda a: (Out(a.raw),), "dedup": lambda a: (Out(a.clean),),
            "evaluate": lambda a: (Out(a.fid_blur, cache=False),)}
    ins = {"collect": lambda a: (), "dedup": lambda a: (a.raw,), "evaluate": lambda a: (a.clean,)}
    return tuple(StageSpec(n, _body(n), ("prior",), ins[n], outs[n], f"stand-in {n}") for n in NAMES)


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the DAG by the stand-ins for this test."""
    specs = standin_specs()
    monkeypatch.setattr(pipeline, "STAGES", specs)
    monkeypatch.setattr(pipeline, "BY_NAME", {s.name: s for s in specs})
