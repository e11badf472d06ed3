"""Every entry point turns bad input into one `error:` line and exit 1 (never a traceback)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_config_validate_ok_and_show() -> None:
    proc = _run(["-m", "dalle.cli", "config", "validate"])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    shown = _run(["-m", "dalle.cli", "config", "show", "--preset", "paper-12b"])
    assert shown.returncode == 0 and "d_model: 3968" in shown.stdout


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("prior: [unclosed\n", "not valid YAML"),
        ("just a string\n", "must be a mapping"),
    ],
)
def test_config_validate_bad_file(tmp_path, content: str, needle: str) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text(content)
    _assert_one_line_error(_run(["-m", "dalle.cli", "config", "validate", "--params", str(bad)]),
                           needle)


def test_config_validate_unknown_key(tmp_path) -> None:
    text = (REPO / "params.yaml").read_text().replace("  n_layers:", "  n_layerz:", 1)
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    _assert_one_line_error(_run(["-m", "dalle.cli", "config", "validate", "--params", str(bad)]),
                           "prior.n_layerz: unknown key")


def test_unknown_preset() -> None:
    _assert_one_line_error(_run(["-m", "dalle.cli", "config", "show", "--preset", "nope"]),
                           "preset 'nope' does not exist")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_malformed_params(tmp_path, stage: str) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("prior: {n_layers: many}\n")
    _assert_one_line_error(_run(["-m", f"stages.{stage}", "--params", str(bad)]), "params")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_unknown_preset(stage: str) -> None:
    _assert_one_line_error(_run(["-m", f"stages.{stage}", "--preset", "nope"]),
                           "preset 'nope' does not exist")
