"""Launching a stage on N processes: one code path for horovodrun, `dvc repro` and Prefect.

`python -m stages.train_prior` with `distributed.num_proc: N > 1` and not already under Horovod
re-executes itself as `horovodrun -np N -H <hosts> --gloo python -m stages.train_prior <args>`
(`--gloo` names the controller/rendezvous; the collectives on CUDA tensors go through NCCL when
Horovod was built with HOROVOD_GPU_OPERATIONS=NCCL, see docs/operations.md). Under horovodrun
(HOROVOD_RANK set) nothing is relaunched. A single process never imports horovod.

The Prefect flow takes the same path: `dalle.pipeline.run_stage` asks `will_relaunch` and, when
true, runs `stage_command(...)` (that very `python -m stages.<name>`) as a subprocess instead of
the in-process body (`dalle.stage.StageSpec.main` does the relaunch).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from dalle.config_sections import Distributed
from dalle.errors import ConfigError

# Gloo's own timeout for collectives and rendezvous: a rank that dies makes the others fail
# within this many seconds instead of hanging (overridable from the environment).
DEFAULT_TIMEOUTS = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "60", "HOROVOD_START_TIMEOUT": "60"}



def under_horovod() -> bool:
    return "HOROVOD_RANK" in os.environ


def rank_and_world() -> tuple[int, int]:
    """(rank, number of ranks) of this process: horovodrun's, else (0, 1)."""
    if not under_horovod():
        return 0, 1
    return int(os.environ["HOROVOD_RANK"]), int(os.environ.get("HOROVOD_SIZE", "1"))


def will_relaunch(cfg: Distributed) -> bool:
    """True when a stage run with `cfg` here would re-execute itself under horovodrun."""
    return cfg.num_proc > 1 and not under_horovod()


def stage_command(name: str, params_file: str, preset: Optional[str] = None,
                  overrides: Sequence[str] = ()) -> list[str]:
    """`python -m stages.<name> --params F [--preset P] [-S k=v ...]`: what `dvc repro` runs."""
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)]
    cmd += ["--preset", preset] if preset else []
    return cmd + [arg for item in overrides for arg in ("-S", item)]


def horovodrun_path() -> str:
    local = Path(sys.executable).with_name("horovodrun")
    found = str(local) if local.exists() else shutil.which("horovodrun")
    if not found:
        raise ConfigError("distributed.num_proc > 1 needs `horovodrun` (Horovod) installed in "
                          "this environment; run `make` to set it up")
    return found


def horovodrun_command(cfg: Distributed, argv: Sequence[str]) -> list[str]:
    """The horovodrun command line that runs `argv` (a python command) on cfg.num_proc ranks."""
    hosts = cfg.hosts or f"localhost:{cfg.num_proc}"
    slots = sum(int(h.rsplit(":", 1)[1]) if ":" in h else 1 for h in hosts.split(","))
    if slots < cfg.num_proc:
        raise ConfigError(f"distributed.hosts {hosts!r} offers {slots} slots, fewer than "
                          f"distributed.num_proc {cfg.num_proc}")
    cmd = [horovodrun_path(), "-np", str(cfg.num_proc), "-H", hosts, "--gloo"]
    iface = os.environ.get("HOROVOD_GLOO_IFACE")
    if iface:
        cmd += ["--network-interface", iface]
    return cmd + list(argv)


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in DEFAULT_TIMEOUTS.items():
        env.setdefault(key, value)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def relaunch_if_needed(cfg: Distributed, module: str, args: Optional[Sequence[str]] = None) -> Optional[int]:
    """Run `python -m <module> <args>` under horovodrun when cfg asks for several processes.

    Returns the exit status of the horovodrun job, or None when this process should do the work
    itself (num_proc 1, or already a Horovod rank)."""
    if cfg.num_proc <= 1 or under_horovod():
        return None
    argv = [sys.executable, "-m", module, *(sys.argv[1:] if args is None else args)]
    proc = subprocess.run(horovodrun_command(cfg, argv), env=child_env())
    return proc.returncode
