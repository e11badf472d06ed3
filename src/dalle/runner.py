"""Shared entry-point plumbing for the stages (`dalle.stage`), `flows/` and the CLI.

Expected failures (`DalleError`, disk full, permission denied) end as one `error: ...` line on
stderr with exit status 1, never a traceback; a bad command line is one `error:` line and exit 2.

Signals (docs/reliability.md, "SIGTERM and SIGINT"): while `run_guarded` runs in the main thread,
SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt`, after the handler has stopped every
worker process this process started (`multiprocessing.active_children`: process pools of collect,
dedup, ...). `finally` blocks run as the exception unwinds, so tracking marks the runs KILLED and
temporaries are removed; outputs are left exactly as a kill -9 would leave them (every output is
committed atomically), so a rerun resumes. The exit status is 143 (SIGTERM) or 130 (SIGINT). A
second signal while unwinding takes the default action at once.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

from dalle.errors import DalleError

log = logging.getLogger("dalle")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (a BaseException, so that no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` is a SIGINT/SIGTERM unwinding (the run was killed, not failed)."""
    return isinstance(exc, (KeyboardInterrupt, Terminated))


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def one_line(exc: BaseException) -> Optional[str]:
    """The user-facing line for an expected failure, or None for a bug (keep the traceback)."""
    if isinstance(exc, DalleError):
        return exc.one_line()
    if isinstance(exc, OSError) and exc.errno in {errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                                                  errno.EROFS}:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno in {errno.EACCES, errno.EPERM}:
        where = f" {exc.filename}" if exc.filename else ""
        return f"permission denied{where} ({exc.strerror})"
    if isinstance(exc, MemoryError):
        detail = f" ({exc})" if str(exc) else ""
        return f"out of memory{detail}; if a stage was training, lower its batch size in params.yaml"
    return None


def stop_children() -> None:
    """Kill every worker process this process started with multiprocessing (pool workers inherit
    the handlers of their parent, so SIGTERM would only unwind their current task): they leave
    what a kill -9 leaves, which every output tolerates."""
    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(Exception):
            child.kill()
    server = getattr(multiprocessing.forkserver, "_forkserver", None)  # a pool's fork server
    with contextlib.suppress(Exception):
        if getattr(server, "_forkserver_pid", None):
            os.kill(server._forkserver_pid, signal.SIGKILL)  # type: ignore[union-attr]
    for child in children:
        with contextlib.suppress(Exception):
            child.join(2.0)


def _quiet_pool_race(previous: Callable[[Any], Any]) -> Callable[[Any], None]:
    """Python < 3.12 (gh-107219): a process pool's manager thread, noticing its killed workers
    after their futures were cancelled, raises InvalidStateError; harmless while stopping."""
    def hook(args: Any) -> None:
        if not isinstance(args.exc_value, concurrent.futures.InvalidStateError):
            previous(args)
    return hook


def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
    for sig in EXIT_CODES:  # a second signal while unwinding: the default action, at once
        signal.signal(sig, signal.SIG_DFL)
    threading.excepthook = _quiet_pool_race(threading.excepthook)
    stop_children()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM/SIGINT stop the workers and unwind the main thread (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in EXIT_CODES}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call fn; expected failures become one line + exit 1, SIGINT/SIGTERM exit 130/143."""
    try:
        with signals_unwind():
            return fn()
    except KeyboardInterrupt:
        fail("interrupted (SIGINT); outputs are as a kill leaves them: rerun to resume", code=130)
    except Terminated as exc:
        fail(f"terminated ({signal.Signals(exc.signum).name}); outputs are as a kill leaves them: "
             "rerun to resume", code=EXIT_CODES.get(exc.signum, 143))
    except Exception as exc:  # noqa: BLE001 - filtered by one_line, bugs re-raised
        line = one_line(exc)
        if line is None:
            raise
        fail(line)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line naming the argument (exit 2)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see {self.prog} --help)", code=2)


def parse_stage_args(name: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=f"python -m stages.{name}",
                            description=f"Run the `{name}` stage of the dalle DAG.")
    parser.add_argument("--params", default=os.environ.get("DALLE_PARAMS", "params.yaml"),
                        help="params file (default: params.yaml, env DALLE_PARAMS)")
    parser.add_argument("--preset", default=os.environ.get("DALLE_PRESET") or None,
                        help="overlay presets/<NAME>.yaml (env DALLE_PRESET)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one param, e.g. -S prior.n_layers=8")
    return parser.parse_args(argv)


def configure_logging() -> None:
    level = os.environ.get("DALLE_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        level = "INFO"  # a typo in DALLE_LOG_LEVEL is not worth a traceback
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
