"""Concurrent runs in one workspace: a second `dvc repro` is refused by DVC's repository lock while
the first runs (and the first still finishes); two tracked stage runs at once against one sqlite
MLflow database all finish with every metric step, and the database passes `integrity_check`."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dalle import runs
from tests.reliability.conftest import REPO, write_params

BIN = REPO / ".venv" / "bin"
STAGE = """stages:
  slow:
    cmd: python wait.py
    deps:
      - wait.py
    outs:
      - out.txt
"""
WAIT = """import pathlib, time
pathlib.Path("started").touch()
while not pathlib.Path("go").exists():
    time.sleep(0.1)
pathlib.Path("out.txt").write_text("done")
"""

def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": str(REPO), "DALLE_LOG_LEVEL": "WARNING", "HOME": os.environ.get("HOME", str(tmp))}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_second_dvc_repro_is_refused_by_the_lock(tmp_path: Path) -> None:
    repo, env = tmp_path / "repo", _env(tmp_path)
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    (repo / "dvc.yaml").write_text(STAGE)
    (repo / "wait.py").write_text(WAIT)
    first = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(repo / "started", first)  # the first repro holds the lock and runs its stage
        second = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0
        assert "lock" in (second.stdout + second.stderr).lower(), second.stdout + second.stderr
    finally:
        (repo / "go").touch()
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert (repo / "out.txt").read_text() == "done"


def test_concurrent_tracked_runs_share_one_sqlite_db(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    params = write_params(tmp_path, {"tracking.enabled": True, "tracking.uri": uri})
    env = {**_env(tmp_path), "MLFLOW_TRACKING_URI": uri}
    env.pop("DALLE_PIPELINE_ID", None)
    steps, names = 100, ["writer_a", "writer_b"]
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.set_tracking_uri({uri!r}); "
                    "mlflow.search_experiments()"], env=env, check=True, capture_output=True, timeout=300)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.reliability.mlflow_writer", str(params), n, str(steps)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in names]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    stage_runs = runs.search_runs("dalle", kind="stage", uri=uri)
    assert sorted(r.stage for r in stage_runs) == names
    assert all(r.status == "FINISHED" for r in stage_runs)
    for run in stage_runs:
        assert len(runs.metric_history(run.run_id, "loss", uri=uri)) == steps
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
