"""Launching a stage on N processes: one code path for horovodrun, `dvc repro` and Prefect.

`python -m stages.train_prior` with `distributed.num_proc: N > 1` and not already under Horovod
re-executes itself as `horovodrun -np N -H <hosts> --gloo python -m stages.train_prior <args>`
(`--gloo` on CPU; on GPUs Horovod uses NCCL for the collectives when built with it). Under
horovodrun (HOROVOD_RANK set) nothing is relaunched. A single process never imports horovod.
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


def relaunch_stage(name: str, argv: Optional[Sequence[str]] = None) -> None:
    """For `stages/<name>.py`, BEFORE `stage_main` opens its MLflow run: when params ask for
    num_proc > 1 and this is not a Horovod rank, run the stage under horovodrun and exit with its
    status (rank 0 of the job then tracks the run). Otherwise return and let the stage run here."""
    from dalle.config import load_params
    from dalle.runner import fail, parse_stage_args, run_guarded

    args = parse_stage_args(name, argv)
    if under_horovod():
        return
    params = run_guarded(lambda: load_params(args.params, args.preset, args.overrides))
    if params.distributed.num_proc <= 1:
        return
    raw = list(sys.argv[1:] if argv is None else argv)
    code = run_guarded(lambda: relaunch_if_needed(params.distributed, f"stages.{name}", raw))
    if code:
        fail(f"distributed stage {name} failed: horovodrun exited with status {code} "
             "(the failing rank's output is above)", code=code)
    raise SystemExit(0)
