"""`make ui` (scripts/ui.sh): the Prefect server and the MLflow UI come up on 127.0.0.1 on the
ports given, the script prints both URLs, both answer over HTTP, and Ctrl-C (SIGINT to the
process group, as a terminal sends it) stops both. A busy port is one line and exit 1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def ui_env(tmp: Path, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    return dict(os.environ, PREFECT_PORT=str(prefect_port), MLFLOW_PORT=str(mlflow_port),
                PREFECT_HOME=str(tmp / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'm.db'}")


def test_make_ui_serves_both_on_loopback_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    pp, mp = free_port(), free_port()
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "ui.sh")], cwd=REPO, text=True,
                            env=ui_env(tmp_path, pp, mp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            lines.append(proc.stdout.readline())
            if "Ctrl-C stops both servers" in lines[-1]:
                break
        text = "".join(lines)
        assert f"Prefect UI : http://127.0.0.1:{pp}" in text, text
        assert f"MLflow UI  : http://127.0.0.1:{mp}" in text, text
        assert answers(f"http://127.0.0.1:{pp}/api/health") and answers(f"http://127.0.0.1:{pp}/")
        assert answers(f"http://127.0.0.1:{mp}/health") and answers(f"http://127.0.0.1:{mp}/")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
        for port in (pp, mp):  # both servers are gone
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(["bash", str(REPO / "scripts" / "ui.sh")], cwd=REPO, text=True,
                             env=ui_env(tmp_path, port, free_port()), capture_output=True,
                             timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (set PREFECT_PORT/MLFLOW_PORT)"]
