"""The project's error types: each carries one line a user can act on.

Stage entry points (`dalle.stage.StageSpec.main`) and the CLI catch `DalleError`, print
`error: <message>` on one line and exit 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class DalleError(Exception):
    """Base class: an expected failure with a one-line, user-facing message."""

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return text or type(self).__name__


class ConfigError(DalleError):
    """params.yaml / preset problem: names the dotted key, the bad value and what was expected."""


class CheckpointError(DalleError):
    """A checkpoint that is missing, truncated, a pickle, or built for another config."""


class DataError(DalleError):
    """Bad or empty input data (URL lists, images, captions, shards)."""


class OutputError(DalleError):
    """An output path that cannot be written (permissions, disk full, ...)."""
