"""The Prefect flow with `distributed.num_proc: 2` spreads `train_prior` over two Horovod ranks
(Gloo) by the path `dvc repro` takes: the task runs `python -m stages.train_prior --params F -S ..`
as a subprocess, which relaunches itself under horovodrun. One MLflow stage run (rank 0's) under
the flow's parent run; the workdir's own params.yaml is never read (it is broken on purpose)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

prefect_testing = pytest.importorskip("prefect.testing.utilities")

from dalle import pipeline, runs  # noqa: E402
from dalle.io import read_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_prior_stage import TINY, write_tokens  # noqa: E402

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
BROKEN = "prior: [this is not yaml\n"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "stages").symlink_to(REPO / "stages")
    (tmp_path / "params.yaml").write_text(BROKEN)  # read by anything that ignores --params
    (tmp_path / "tiny.yaml").write_text((REPO / "params.yaml").read_text())
    write_tokens(tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HOROVOD_GLOO_TIMEOUT_SECONDS", "60")
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def overrides(root: Path, num_proc: int) -> list[str]:
    paths = [f"paths.{k}={root / 'data' / k}" for k in ("tokens", "models", "metrics", "plots")]
    tiny = [o for o in TINY if not o.startswith("tracking.")]
    return [*tiny, *paths, f"distributed.num_proc={num_proc}", "distributed.shard_group_size=2"]


def test_flow_spreads_train_prior_over_two_ranks(workdir: Path, capfd: pytest.CaptureFixture) -> None:
    import flows.pipeline as fp

    with prefect_testing.prefect_test_harness(server_startup_timeout=120):
        state = fp.dalle_pipeline(params_file="tiny.yaml", overrides=overrides(workdir, 2),
                                  stages=["train_prior"], workdir=str(workdir), return_state=True)
    assert state.is_completed(), state
    [result] = state.result()
    data = workdir / "data"
    assert result["metrics"] == read_json(data / "metrics" / "prior.json")
    assert result["metrics"]["steps"] == 6
    assert (data / "models" / "prior.safetensors").is_file()
    err = capfd.readouterr().err
    assert "[0]<stderr>:train_prior" in err  # horovodrun's rank 0 draws the progress bar ...
    assert "[1]<stderr>:train_prior" not in err  # ... and only rank 0

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    stage_runs = runs.search_runs("dalle", kind="stage", stage="train_prior", uri=uri)
    assert [(r.run_id, r.status) for r in stage_runs] == [(result["mlflow_run_id"], "FINISHED")]
    assert stage_runs[0].params["distributed.num_proc"] == "2"
    [parent] = runs.search_runs("dalle", uri=uri)
    assert parent.name == f"pipeline prefect-{state.state_details.flow_run_id}"
    assert parent.metrics["train_prior/steps"] == 6


def test_failing_distributed_stage_is_one_line(workdir: Path) -> None:
    from dalle.config import load_params

    bad = [*overrides(workdir, 2), "paths.tokens=/nonexistent/tokens"]
    params = load_params("tiny.yaml", None, bad)
    with pytest.raises(pipeline.StageFailed) as err:
        pipeline.run_stage("train_prior", params, "tiny.yaml", None, bad)
    assert err.value.one_line() == (
        "stage train_prior on 2 processes failed: `python -m stages.train_prior` exited with "
        "status 1 (its output is above)")
