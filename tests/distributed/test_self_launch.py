"""A stage declared `distributed=True` and asked for distributed.num_proc 2 re-executes itself
under horovodrun before opening its MLflow run, and then runs as two Horovod ranks (the path
`dvc repro` takes)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]

STAGE = """
import os
from pathlib import Path
from dalle.stage import StageSpec


def fn(art, tracker, distributed):
    rank = os.environ.get("HOROVOD_RANK", "single")
    if rank == os.environ.get("FAKE_DIE_RANK"):
        raise SystemExit(3)
    Path(os.environ["FAKE_OUT"], "rank" + rank).write_text(os.environ.get("HOROVOD_SIZE", "1"))
    return {}


STAGE = StageSpec("fake", fn, ("distributed",), lambda a: (), lambda a: (), "a fake stage",
                  distributed=True)
if __name__ == "__main__":
    STAGE.main()
"""


def run_fake(tmp: Path, *overrides: str, die: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    (tmp / "stages").mkdir(exist_ok=True)
    (tmp / "stages" / "__init__.py").write_text("")
    (tmp / "stages" / "fake.py").write_text(textwrap.dedent(STAGE))
    shutil.copy(REPO / "params.yaml", tmp / "params.yaml")
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tmp), FAKE_OUT=str(out), FAKE_DIE_RANK=die,
               OMP_NUM_THREADS="1")
    env.pop("HOROVOD_RANK", None)
    args = [a for o in ("tracking.enabled=false", *overrides) for a in ("-S", o)]
    proc = subprocess.run([sys.executable, "-m", "stages.fake", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_stage_relaunches_itself_under_horovodrun(tmp_path: Path) -> None:
    proc, out = run_fake(tmp_path, "distributed.num_proc=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1"]
    assert (out / "rank1").read_text() == "2"


def test_single_process_runs_in_place(tmp_path: Path) -> None:
    proc, out = run_fake(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["ranksingle"]


def test_a_failing_rank_fails_the_stage_in_one_line(tmp_path: Path) -> None:
    proc, _ = run_fake(tmp_path, "distributed.num_proc=2", die="1")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("error: distributed stage fake failed: horovodrun exited with status 1 "
                    "(the failing rank's output is above)")


def test_bad_topology_is_one_line(tmp_path: Path) -> None:
    proc, _ = run_fake(tmp_path, "distributed.num_proc=3", "distributed.shard_group_size=2")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "shard_group_size 2" in lines[0]
