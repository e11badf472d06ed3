"""Shared fixtures: tiny params, isolated tracking, repo paths."""
from __future__ import annotations

import logging
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


def _stream_of(handler: logging.Handler) -> object:
    console = getattr(handler, "console", None)  # rich-based handlers (Prefect's console handler)
    return getattr(handler, "stream", None) or getattr(console, "file", None)


@pytest.fixture(autouse=True)
def _drop_log_handlers_on_closed_streams():
    """A Prefect test harness configures console log handlers on the stream pytest is capturing
    for that test; once the capture closes, every later log record prints a 'Logging error'
    traceback into whatever test runs next. Drop such handlers after each test."""
    yield
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(_stream_of(handler), "closed", False):
                logger.removeHandler(handler)
