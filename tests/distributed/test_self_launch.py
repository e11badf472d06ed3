"""`relaunch_if_needed`: a process asked for num_proc 2 re-executes itself under horovodrun and
the module then runs as two Horovod ranks (the path `dvc repro` / Prefect take)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ENTRY = """
import os, sys
from pathlib import Path
from dalle.config_sections import Distributed
from dalle.distributed.launch import relaunch_if_needed

code = relaunch_if_needed(Distributed(num_proc=2), "selflaunch_mod", sys.argv[1:])
if code is not None:
    raise SystemExit(code)
Path(sys.argv[1], "rank" + os.environ["HOROVOD_RANK"]).write_text(os.environ["HOROVOD_SIZE"])
"""


def test_stage_relaunches_itself_under_horovodrun(tmp_path: Path) -> None:
    (tmp_path / "selflaunch_mod.py").write_text(textwrap.dedent(ENTRY))
    out = tmp_path / "out"
    out.mkdir()
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "selflaunch_mod", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1"]
    assert (out / "rank1").read_text() == "2"
