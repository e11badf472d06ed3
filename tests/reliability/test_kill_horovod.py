"""kill -9 of `train_prior` on two Horovod ranks (`distributed.num_proc: 2`, horovodrun + Gloo):
the whole process group (horovodrun and both ranks) is killed once the step-`KILL_AFTER` per-rank
checkpoints of both ranks exist (polled from here: a deterministic trigger, not a timer); the rerun
resumes from them and its exported weights equal an uninterrupted two-rank run's bit for bit.
One kill point only (three horovodrun launches already cost ~1 min on 2 cores): docs/reliability.md."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_prior_stage import TINY, write_tokens
from tests.reliability.compare import same_file
from tests.reliability.conftest import REPO

pytestmark = pytest.mark.distributed
HOROVODRUN = Path(sys.executable).with_name("horovodrun")
KILL_AFTER = 4  # steps: per-rank checkpoints every 2 of 10


def _cmd(root: Path) -> list[str]:
    sets = [*TINY, "prior.steps=10", "prior.checkpoint_every=2", "tokenizer.bpe_dropout=0",
            "distributed.num_proc=2", "distributed.shard_group_size=2",
            *(f"paths.{k}={root / k}" for k in ("tokens", "models", "metrics", "plots"))]
    return [sys.executable, "-m", "stages.train_prior", "--params", str(REPO / "params.yaml"),
            *(a for s in sets for a in ("-S", s))]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DALLE_LOG_LEVEL": "WARNING",
           "HOROVOD_GLOO_TIMEOUT_SECONDS": "60", "PATH": f"{HOROVODRUN.parent}:{os.environ['PATH']}"}
    env.pop("HOROVOD_RANK", None)
    return env


def _run(root: Path) -> None:
    out = subprocess.run(_cmd(root), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_rank_prior_resumes_after_kill(tmp_path: Path) -> None:
    if not HOROVODRUN.exists():
        pytest.skip("horovodrun is not installed in this venv")
    base, killed = tmp_path / "base", tmp_path / "killed"
    write_tokens(base), write_tokens(killed)
    _run(base)
    proc = subprocess.Popen(_cmd(killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marks = [killed / "models" / "prior.ckpt" / f"rank{r}.step{KILL_AFTER}.safetensors" for r in (0, 1)]
    deadline = time.monotonic() + 240
    while not all(m.exists() for m in marks):
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # horovodrun and both ranks, at once
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _run(killed)
    for name in ("prior.safetensors", "prior.json"):
        assert same_file(base / "models" / name, killed / "models" / name), name
    assert same_file(base / "plots" / "prior_loss.json", killed / "plots" / "prior_loss.json")
    assert not (killed / "models" / "prior.ckpt").exists()
