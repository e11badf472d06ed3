"""Shared entry-point plumbing for the stages (`dalle.stage`), `flows/` and the CLI.

Expected failures (`DalleError`, disk full, permission denied) end as one `error: ...` line on
stderr with exit status 1, never a traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from dalle.errors import DalleError

log = logging.getLogger("dalle")


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def one_line(exc: BaseException) -> Optional[str]:
    """The user-facing line for an expected failure, or None for a bug (keep the traceback)."""
    if isinstance(exc, DalleError):
        return exc.one_line()
    if isinstance(exc, OSError) and exc.errno in {errno.ENOSPC, errno.EACCES, errno.EROFS,
                                                  errno.EDQUOT}:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory; lower the batch size in params.yaml"
    return None


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call fn; turn expected failures into one line + exit 1 and Ctrl-C into exit 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except Exception as exc:  # noqa: BLE001 - filtered by one_line, bugs re-raised
        line = one_line(exc)
        if line is None:
            raise
        fail(line)


def parse_stage_args(name: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}",
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
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
