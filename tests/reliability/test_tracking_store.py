"""Round two, class 10 (docs/reliability.md, "The tracking store"). Decision: a store that cannot
be used fails the stage before any work, within seconds, in one line naming it and the way out
(tracking.enabled: false); a store that breaks in the middle of a run costs one warning and the
run goes on untracked (its outputs and metrics files are what matter). Each case runs a probe
stage as its own process, like `python -m stages.<name>`."""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from dalle.tracking import MlflowTracker
from tests.reliability.conftest import REPO, write_params

PROBE = ("from dalle.stage import StageSpec; StageSpec('probe', lambda art, t: {}, (), lambda a: (), "
         "lambda a: (), 'a probe').main()")
LIMIT = 20.0  # s: "within seconds" (MLflow itself retried for minutes), on the loaded 2-core machine


PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _probe(tmp: Path, uri: str, wrap: str = "") -> tuple[subprocess.CompletedProcess, float]:
    params = write_params(tmp, {"tracking.enabled": True, "tracking.uri": None})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": PYTHONPATH, "DALLE_LOG_LEVEL": "WARNING"}
    env.pop("DALLE_TEST", None)
    cmd = [sys.executable, "-c", PROBE, "--params", str(params)]
    if wrap:
        cmd = ["unshare", "-rm", "sh", "-c", f"{wrap} && exec {shlex.join(cmd)}"]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    return out, time.monotonic() - start


def _one_line(out: subprocess.CompletedProcess, took: float, needle: str) -> str:
    lines = re.findall(r"error: [^\r\n]*", out.stderr)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and needle in lines[0], out.stderr[-3000:]
    assert "tracking.enabled: false" in lines[0]
    assert took < LIMIT, f"{took:.1f} s"
    print(f"{took:.1f} s: {lines[0]}")
    return lines[0]


def test_a_garbage_sqlite_file(tmp_path: Path) -> None:  # listed
    (tmp_path / "mlflow.db").write_bytes(b"this is not a database" * 100)
    out, took = _probe(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    _one_line(out, took, "is not an sqlite database")


def test_a_store_under_a_file(tmp_path: Path) -> None:  # ours: the directory cannot exist
    (tmp_path / "afile").write_text("x")
    out, took = _probe(tmp_path, f"sqlite:///{tmp_path}/afile/sub/mlflow.db")
    _one_line(out, took, "is not a directory")


def _userns_ok(tmp: Path) -> str:
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {tmp} {tmp}"],
                         capture_output=True, text=True, timeout=30)
    return "" if out.returncode == 0 else f"no user-namespace bind mounts here: {out.stderr.strip()[:120]}"


def _read_only(path: Path) -> str:
    """Shell that makes `path` a read-only bind mount: EROFS even for root (the probe's only way
    to make a file unwritable on a machine where the tests run as root)."""
    p = shlex.quote(str(path))
    return f"mount --bind {p} {p} && mount -o remount,bind,ro {p}"


@pytest.mark.parametrize("existing", [True, False], ids=["read-only-file", "unwritable-dir"])
def test_a_store_that_cannot_be_written(tmp_path: Path, existing: bool) -> None:  # listed, both
    reason = _userns_ok(tmp_path)
    if reason:
        pytest.skip(reason)
    store = tmp_path / "store"
    store.mkdir()
    if existing:  # a real, valid store (made by MLflow), then mounted read-only
        ok, _ = _probe(tmp_path / "make", f"sqlite:///{store}/mlflow.db")
        assert ok.returncode == 0, ok.stderr[-2000:]
    out, took = _probe(tmp_path, f"sqlite:///{store}/mlflow.db", wrap=_read_only(store))
    _one_line(out, took, "is read-only" if existing else "is not writable")


class _NotMlflow(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        body = b"<html>hello, I am not MLflow</html>"
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        return None


def _serve(status: int) -> Iterator[str]:
    handler = type("H", (_NotMlflow,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 404, 500], ids=["html-200", "html-404", "error-500"])
def test_a_server_that_is_not_mlflow(tmp_path: Path, status: int) -> None:  # listed (200, 404)
    for uri in _serve(status):  # 500: ours - MLflow retries server errors with backoff
        out, took = _probe(tmp_path, uri)
        _one_line(out, took, "cannot be used")


class _Breaking:
    """An MlflowClient stand-in whose store fails after `ok` writes."""

    def __init__(self, ok: int) -> None:
        self.ok, self.calls = ok, 0

    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls > self.ok:
            raise OSError("attempt to write a readonly database")


def test_a_store_that_breaks_mid_run_costs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    client = _Breaking(ok=2)
    tracker = MlflowTracker(client, "run-1")
    with caplog.at_level(logging.WARNING, logger="dalle.tracking"):
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step=step)
    assert client.calls == 3  # two written, the third failed, nothing tried after
    warnings = [r for r in caplog.records if "continues untracked" in r.getMessage()]
    assert len(warnings) == 1 and "readonly database" in warnings[0].getMessage()
