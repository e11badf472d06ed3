"""Disk full during a stage: one clear `error:` line, exit 1, and nothing partial promoted as
complete. Two ways to fill the disk without root: a real 256 kB tmpfs mounted in a user+mount
namespace (`unshare -rm`, ENOSPC; skipped with its reason where the kernel forbids it) and a
per-file size limit (`RLIMIT_FSIZE` with SIGXFSZ ignored, EFBIG)."""
from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dalle.data import shards
from tests.reliability.compare import leftovers
from tests.reliability.conftest import REPO, copy_inputs, inputs_of, write_params

COLLECT = {"data.synthetic.n_images": 96, "data.image_size": 32, "data.shard_size": 16}


def _tmpfs_ok(tmp: Path) -> str:
    probe = tmp / "probe"
    probe.mkdir()
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                         capture_output=True, text=True, timeout=30)
    return "" if out.returncode == 0 else f"no user-namespace tmpfs here: {out.stderr.strip()[:120]}"


def _run(module: str, params: Path, full: Path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DALLE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", module, "--params", str(params)]
    if mode == "tmpfs":
        after = shlex.quote(f"{full}.after")  # the tmpfs goes with the namespace: keep a copy
        script = (f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(full))} && {{ {shlex.join(cmd)}; "
                  f"rc=$?; mkdir -p {after}; cp -a {shlex.quote(str(full))}/. {after}/; exit $rc; }}")
        return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal death
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = re.findall(r"error: [^\r\n]*", out.stderr)  # may follow an unfinished progress bar
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("mode", ["tmpfs", "fsize"])
def test_collect_disk_full(tmp_path: Path, mode: str) -> None:
    if mode == "tmpfs" and (why := _tmpfs_ok(tmp_path)):
        pytest.skip(why)
    params = write_params(tmp_path, COLLECT)
    (tmp_path / "raw").mkdir()
    line = _one_line(_run("stages.collect", params, tmp_path / "raw", mode))
    assert "raw" in line and ("disk full" in line or "too large" in line), line
    print(f"collect, {mode}: {line}")
    raw = tmp_path / ("raw.after" if mode == "tmpfs" else "raw")
    assert not (raw / "manifest.parquet").exists() and not leftovers(raw)
    for i in shards.completed_shards(raw):  # every shard marked complete really is
        rows = pd.read_parquet(shards.shard_file(raw, i, ".parquet"))
        members = {m[0] for m in shards.iter_tar(shards.shard_file(raw, i, ".tar"))}
        assert set(rows.loc[rows["status"] == "ok", "key"]) == members


def test_train_dvae_disk_full(world: Path, tmp_path: Path) -> None:
    if why := _tmpfs_ok(tmp_path):
        pytest.skip(why)
    root = tmp_path / "run"
    big = {"dvae.checkpoint_every": 1, "dvae.n_hid": 32, "dvae.dec_n_hid": 32}  # > 256 kB of state
    params = copy_inputs(world, root, inputs_of("train_dvae", world), big)
    (root / "models").mkdir()
    line = _one_line(_run("stages.train_dvae", params, root / "models", "tmpfs"))
    assert "models" in line and "disk full" in line, line
    print(f"train_dvae, tmpfs: {line}")
    models = root / "models.after"
    assert not (models / "dvae.safetensors").exists() and not leftovers(models)
