"""Shared fixtures: tiny params, isolated tracking, repo paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never write into the repo's mlflow.db unless they ask for it.
os.environ.setdefault("DALLE_TEST", "1")


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def tmp_mlflow(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
