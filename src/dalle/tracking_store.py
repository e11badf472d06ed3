"""Whether an MLflow store can be used, found in seconds (docs/reliability.md, "The tracking
store"): MLflow itself retries a bad sqlite file or a failing server for minutes. Kept apart from
`dalle.tracking` (which alone imports mlflow): nothing here needs mlflow.
"""
from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from dalle.errors import DalleError


class TrackingError(DalleError):
    """The tracking server cannot be reached or refused a request."""


def mask_uri(uri: str) -> str:
    """Hide credentials in a URI for logs: http://user:secret@host -> http://***@host."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", uri)


def probe_http(uri: str, timeout: float = 3.0) -> None:
    """GET <server>/health with a short timeout, so a dead server fails fast, not after retries."""
    parsed = urlparse(uri)
    if parsed.scheme not in {"http", "https"}:
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: reachable (proxies may not expose /health)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TrackingError(f"MLflow server {mask_uri(uri)} is not reachable ({reason}); unset "
                            "MLFLOW_TRACKING_URI (and tracking.uri) to use the embedded sqlite "
                            "store, or set tracking.enabled: false") from None


_SQLITE_MAGIC = b"SQLite format 3\x00"
_HINT = ("fix or move it, point MLFLOW_TRACKING_URI / tracking.uri elsewhere, or set "
         "tracking.enabled: false to run untracked")


def _sqlite_error(path: Path, write: bool) -> Optional[str]:
    """Why the sqlite store at `path` cannot be used (None: it can), found in milliseconds;
    MLflow itself would retry opening a bad one for minutes."""
    if path.exists():
        if not path.is_file():
            return "is not a file"
        try:
            with open(path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if head and head != _SQLITE_MAGIC:
            return "is not an sqlite database"
        if write and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
            return "is read-only (the file or its directory)"
        try:  # a damaged schema page, or a file sqlite cannot lock
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                    timeout=5)) as con:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            return f"cannot be opened by sqlite ({exc})"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # MLflow creates missing directories
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if write and not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


def check_store(uri: str, write: bool = True) -> None:
    """One TrackingError line, within seconds, for a store MLflow cannot use."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        why = _sqlite_error(path, write)
        if why is not None:
            raise TrackingError(f"MLflow store {mask_uri(uri)} {why}; {_HINT}")
    probe_http(uri)


HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Any failure of MLflow while a run is opened becomes one TrackingError line."""
    try:
        yield
    except DalleError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, sqlalchemy, requests, JSON...
        first = " ".join(str(exc).split())[:160]
        raise TrackingError(f"MLflow store {mask_uri(uri)} cannot be used ({type(exc).__name__}: "
                            f"{mask_uri(first)}); {_HINT}") from None
