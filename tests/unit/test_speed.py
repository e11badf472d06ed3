"""Every stage records its wall time and the machine's reference matmul speed in its metrics."""
from __future__ import annotations

import json
import time

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.io import write_json
from dalle.speed import matmul_gflops
from dalle.stage import Out, StageSpec
from dalle.tracking import NullTracker
from tests.conftest import REPO


class _Logged(NullTracker):
    def __init__(self) -> None:
        self.logged: dict = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.update(metrics)


def test_matmul_reference_is_a_plausible_speed():
    gflops = matmul_gflops(repeats=3, side=256)
    assert 0.5 < gflops < 1e6


def _spec(fn, metric: bool) -> StageSpec:
    return StageSpec("fake", fn, params=(), inputs=lambda a: (),
                     outputs=lambda a: (Out(a.metrics("fake"), metric=metric),), summary="test")


def test_stage_metrics_get_time_and_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", overrides=["paths.metrics=m"])

    def written(art: Artefacts, tracker) -> dict:  # a stage that writes its own metrics file
        time.sleep(0.2)
        write_json(art.metrics("fake"), {"loss": 1.5})
        return {"loss": 1.5}

    tracker = _Logged()
    out = _spec(written, True).run(params, tracker)
    saved = json.loads((tmp_path / "m" / "fake.json").read_text())
    assert saved["loss"] == 1.5 and saved["stage_seconds"] >= 0.2
    assert saved["reference_matmul_gflops"] > 0 and out["stage_seconds"] == saved["stage_seconds"]
    assert set(tracker.logged) == {"stage_seconds", "reference_matmul_gflops"}


def test_returned_metrics_become_the_file_when_the_stage_writes_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", overrides=["paths.metrics=m"])
    _spec(lambda art, tracker: {"images_per_s": 10.0}, True).run(params, NullTracker())
    saved = json.loads((tmp_path / "m" / "fake.json").read_text())
    assert saved["images_per_s"] == 10.0 and "stage_seconds" in saved
    _spec(lambda art, tracker: {"x": 1}, False).run(params, NullTracker())  # no metric output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["fake.json"]
