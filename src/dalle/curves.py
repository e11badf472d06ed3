"""Training curves as DVC plots files: every metric a stage logs with a step, kept on rank 0 and
written to the stage's curves file when the stage succeeds (`dalle.stage.tracked`)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Mapping, Optional

from dalle.io import write_json
from dalle.tracking import NullTracker


class CurveRecorder(NullTracker):
    """Passes everything to the inner tracker and keeps every metric logged with a step, so the
    stage can leave its curves as a DVC plots file (`Artefacts.curves(stage)`).

    With a `journal` path every row is also appended there as it is logged, so a run killed
    mid-training does not lose its curve: the resumed run's file keeps the journal's rows for the
    steps before the first one it logs itself (a run that starts afresh replaces them all)."""

    def __init__(self, inner: NullTracker, journal: Optional[Path] = None) -> None:
        self.inner, self.journal = inner, journal
        self.enabled = inner.enabled
        self.run_id = inner.run_id
        self.rows: dict[int, dict[str, float]] = {}
        self.log_params, self.log_artifact = inner.log_params, inner.log_artifact
        self.log_dict, self.set_tags = inner.log_dict, inner.set_tags
        self.register_model = inner.register_model  # type: ignore[method-assign]

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if step is not None:
            row = self.rows.setdefault(int(step), {"step": int(step)})
            row.update({k: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if self.journal is not None:
                self.journal.parent.mkdir(parents=True, exist_ok=True)
                with open(self.journal, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
        self.inner.log_metrics(metrics, step)

    def _journal_rows(self) -> dict[int, dict[str, float]]:
        rows: dict[int, dict[str, float]] = {}
        if self.journal is None or not self.journal.is_file():
            return rows
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a kill
                row = json.loads(line)
                rows[int(row["step"])] = row
        return rows

    def write(self, path: Path) -> None:
        first = min(self.rows, default=None)
        rows = {s: r for s, r in self._journal_rows().items() if first is None or s < first}
        rows.update(self.rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, [rows[s] for s in sorted(rows)])
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)
