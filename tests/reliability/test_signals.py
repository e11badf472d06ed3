"""Round two, class 11 (docs/reliability.md, "SIGTERM and SIGINT"): a stage that gets SIGTERM or
SIGINT stops its pool workers, marks its MLflow stage run and the pipeline's parent run KILLED,
leaves its outputs as a kill -9 would (test_kill_resume.py: resumed outputs equal) and exits 143
or 130. Each case runs `python -m stages.collect` as its own process group, as a shell would."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.reliability import killer
from tests.reliability.conftest import REPO, write_params
from tests.reliability.hostile_server import HostileServer, serve_hostile

WORLD = {"data.synthetic.n_images": 2000, "data.shard_size": 50, "data.image_size": 64}


PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _start(root: Path, extra: dict[str, Any]) -> subprocess.Popen:
    params = write_params(root, {"tracking.enabled": True,
                                 "tracking.uri": f"sqlite:///{root}/mlflow.db", **extra})
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "DALLE_LOG_LEVEL": "WARNING"}
    env.pop("DALLE_PIPELINE_ID", None)
    return subprocess.Popen([sys.executable, "-m", "stages.collect", "--params", str(params)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, done: Any, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)


def _workers(pid: int) -> list[int]:
    return [m for m in killer.group_members(pid, settle=0) if m != pid]


def _stop(proc: subprocess.Popen, sig: int, group: bool) -> tuple[int, str, float]:
    start = time.monotonic()
    os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.monotonic() - start


def _statuses(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("select name, status from runs").fetchall())


@pytest.mark.parametrize("sig,group,code", [
    (signal.SIGTERM, False, 143),  # listed: `kill <pid>` of the stage
    (signal.SIGINT, True, 130),  # ours: Ctrl-C, which reaches every process of the group
], ids=["sigterm", "ctrl-c"])
def test_a_signalled_collect_stops_its_workers_and_marks_its_runs(tmp_path: Path, sig: int,
                                                                  group: bool, code: int) -> None:
    proc = _start(tmp_path, WORLD)
    raw = tmp_path / "raw"
    _wait_for(proc, lambda: len(list(raw.glob("*.parquet"))) >= 2 and len(_workers(proc.pid)) >= 2,
              "two shards and the pool workers")
    workers = _workers(proc.pid)
    rc, err, took = _stop(proc, sig, group)
    lines = re.findall(r"error: [^\r\n]*", err)
    assert rc == code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert killer.group_members(proc.pid) == [], f"workers {workers} outlived the stage"
    statuses = _statuses(tmp_path / "mlflow.db")
    assert statuses.pop("collect") == "KILLED"
    assert list(statuses.values()) == ["KILLED"], statuses  # the pipeline's parent run
    assert not (raw / "manifest.parquet").exists()  # not complete, resumable (kill suite)
    print(f"{signal.Signals(sig).name}: {len(workers)} workers stopped, exit {rc} {took:.1f} s "
          f"after the signal; {lines[0]}")


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    yield from serve_hostile(interval=0.2)


def test_sigterm_does_not_wait_for_downloads(tmp_path: Path, hostile: HostileServer) -> None:
    """ours: rows on a peer that never answers (timeout_s 60): the stage still exits at once."""
    table = tmp_path / "urls.tsv"
    table.write_text("url\tcaption\n" + "".join(f"{hostile.base}/silent/{i}\tx {i}\n" for i in range(8)))
    proc = _start(tmp_path, {"data.source": "url_list", "data.url_list.path": str(table),
                             "data.url_list.allow_private": True, "data.url_list.timeout_s": 60.0,
                             "data.url_list.workers": 4})
    _wait_for(proc, lambda: hostile.open_handlers >= 4, "the downloads in flight")
    rc, err, took = _stop(proc, signal.SIGTERM, group=False)
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    assert took < 15.0, f"{took:.1f} s"  # interpreter teardown included; the deadline is 60 s
    assert _statuses(tmp_path / "mlflow.db")["collect"] == "KILLED"
    print(f"SIGTERM with 4 downloads in flight: exit {rc} after {took:.1f} s")
