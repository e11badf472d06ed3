"""Run an entry point (a stage's `main`, `dalle.cli.main`) in this process and see what a user
sees: its exit status and its stderr. A traceback is not caught here: the test fails with it."""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Any, Callable

ERROR_LINE = re.compile(r"error: [^\r\n]*")


@dataclass
class Seen:
    code: int  # 0: success
    stderr: str
    value: Any = None

    @property
    def errors(self) -> list[str]:
        return ERROR_LINE.findall(self.stderr)

    def clean_error(self) -> str:
        """The one `error:` line of a refused input (asserts there is exactly one, and no
        traceback); returns it."""
        assert self.code != 0, f"expected a refusal, got success: {self.stderr[-500:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        assert len(self.errors) == 1, self.stderr[-3000:]
        return self.errors[0]


def seen(fn: Callable[[], Any]) -> Seen:
    """Call fn (which ends in SystemExit on a refusal) with stderr captured."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        try:
            value = fn()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            return Seen(code, buf.getvalue())
    return Seen(int(value) if isinstance(value, int) and not isinstance(value, bool) else 0,
                buf.getvalue(), value)
