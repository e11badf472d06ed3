"""Run a stage in a child process and SIGKILL it at a chosen, deterministic point.

Children are forked from a multiprocessing forkserver that has torch, pandas and the stages
already imported (no torch op has run in it, so forking is safe), which keeps a run at ~0.1 s of
start-up instead of ~3 s of imports. An *event* is one commit of an output (`os.replace`, what
every `dalle.io` atomic write ends with) or one tick of a progress bar (`tqdm.update`). The child
counts events and sends its process group (itself and any worker processes it forked, each of
which counts its own events) SIGKILL just BEFORE event `kill_at`: for a commit that is the
moment after the temporary file is complete but before it is renamed. The effect is exactly
`kill -9` from outside at that instant (no `finally`, no atexit, no flush), without a racy timer.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PRELOAD = ["numpy", "pandas", "pyarrow.parquet", "torch", "safetensors.torch", "PIL.Image", "tqdm",
           "dalle.config", "dalle.io", "dalle.runner", "dalle.tracking", "dalle.data.collect",
           "dalle.data.synthetic", "dalle.data.url_list", "dalle.data.dedup", "dalle.train.dvae",
           "dalle.train.prior", "dalle.tokens", "dalle.generate", "dalle.models.transformer",
           "dalle.models.dvae", "dalle.rerank", "dalle.sample", "dalle.train.dvae_eval", "dalle.eval.oracle",
           "dalle.data.reader", "dalle.train.clip", "dalle.data.tokenizer", "dalle.train.prior_data",
           "torch._dynamo", "torch.optim", "pyarrow.dataset", "PIL.PngImagePlugin", "PIL.JpegImagePlugin",
           "multiprocessing.synchronize", "tokenizers", "tests.reliability.killer"]
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)
@dataclass
class Outcome:
    exitcode: int  # -9 when killed
    events: int  # events counted before exit (or before the kill)
    stderr: str
    log: list[str]  # the events, in order ("commit <file>" / "progress <bar>")
    survivors: list[int]  # processes of the stage's group still alive after it exited


def _install_hooks(kill_at: Optional[int], count_file: Path, sig: int = signal.SIGKILL) -> None:
    import tqdm

    seen = [0]
    once = count_file.with_name("signalled")

    def tick(what: str) -> None:
        seen[0] += 1
        if kill_at is not None and seen[0] >= kill_at:
            if sig == signal.SIGKILL:
                os.killpg(0, signal.SIGKILL)  # the stage and any pool workers it forked
            elif _first(once):  # one signal in all, whichever process gets here first
                os.kill(os.getpgid(0), sig)  # the stage's main process (the group leader)
        with open(count_file, "a") as fh:  # plain append: survives the kill, not an event
            fh.write(f"{what}\n")

    real_replace, real_update = os.replace, tqdm.tqdm.update

    def replace(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        tick(f"commit {Path(dst).name}")
        return real_replace(src, dst, *a, **k)

    def update(self, n=1):  # noqa: ANN001, ANN202
        tick(f"progress {getattr(self, 'desc', '')}")  # a disabled bar has no desc
        return real_update(self, n)

    def iterate(self):  # noqa: ANN001, ANN202 - a bar driven by iteration ticks once per item
        for item in self.iterable:  # (tqdm's own __iter__ updates when a timer says so)
            yield item
            self.update(1)
        self.close()

    os.replace = replace
    tqdm.tqdm.update = update
    tqdm.tqdm.__iter__ = iterate


def _first(marker: Path) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _child(module: str, argv: list[str], kill_at: Optional[int], work: str, cwd: Optional[str],
           sig: int = signal.SIGKILL) -> None:
    count_file, err_file = Path(work) / "events", Path(work) / "stderr"
    if cwd is not None:
        os.chdir(cwd)
    os.setpgid(0, 0)  # own process group: a kill takes the stage's workers with it
    err = open(err_file, "w")  # noqa: SIM115 - stays open until the (possibly killed) end
    os.dup2(err.fileno(), 2)
    sys.stderr = err
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared 2-core machine
    os.environ["DALLE_LOG_LEVEL"] = "WARNING"
    _install_hooks(kill_at, count_file, sig)
    count_file.write_text("")
    code = 0
    try:
        importlib.import_module(module).STAGE.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err.flush()
    os._exit(code)


def run(module: str, argv: Sequence[str], work: Path, kill_at: Optional[int] = None,
        timeout: float = 300.0, cwd: Optional[Path] = None, sig: int = signal.SIGKILL) -> Outcome:
    """Run `module.main(argv)` in a fresh child (in `cwd`, created if given); `work` holds its
    event log and stderr. At event `kill_at`, `sig` (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    proc = _CTX.Process(target=_child, args=(module, list(argv), kill_at, str(work),
                                             None if cwd is None else str(cwd), sig))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"{module} did not finish in {timeout} s")
    stderr = (work / "stderr").read_text(errors="replace") if (work / "stderr").exists() else ""
    events = (work / "events").read_text().splitlines() if (work / "events").exists() else []
    return Outcome(int(proc.exitcode or 0), len(events), stderr, events, group_members(proc.pid))


def group_members(pgid: int, settle: float = 2.0) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, after up to `settle` s for killed
    ones to be reaped."""
    deadline = time.monotonic() + settle
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def kill_points(total: int, seed: int, n: int = 5) -> list[int]:
    """n distinct events in [1, total], drawn with a fixed seed (the test's "random points")."""
    rng = np.random.default_rng(seed)
    return sorted(int(x) for x in rng.choice(np.arange(1, total + 1), size=min(n, total), replace=False))
