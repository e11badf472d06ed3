"""The text table of `dalle runs compare`: quality first, and no wider than the terminal.

Default columns of a pipeline (parent) run, in this order: the samples' oracle all-correct at
N = 32 on seen and held-out captions, the prior's val loss, the dVAE's oracle all-correct on val
reconstructions, CLIP top-1 retrieval and the wall time; then the params whose values differ
between the runs shown. A parent run holds each stage's final metrics as `<stage>/<metric>`
(`dalle.tracking`), so those are the names used here; a stage run (`--stage S`) holds them bare.
Long names are abbreviated in the header and spelled out in a legend under the table; columns
that do not fit are left out and named in a note, so every line fits `width` characters.
"""
from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from dalle.runs import RunRecord

WALL = "wall"  # not an MLflow metric: the run's start to its end (see `wall_seconds`)
# (MLflow name on the pipeline run, short header): what a user compares runs by.
QUALITY = (("evaluate/oracle_all_correct_seen_n32", "seen@32"),
           ("evaluate/oracle_all_correct_holdout_n32", "held@32"),
           ("train_prior/val_loss", "val loss"),
           ("train_dvae/final_oracle_all_correct_recon", "dVAE"),
           ("train_clip/retrieval_top1", "top1"))
SHORT = {**dict(QUALITY), **{name.split("/", 1)[1]: short for name, short in QUALITY}}  # + bare
# Other names with a short header: the oracle at any N, the prior's val loss by part.
PATTERNS = ((re.compile(r"^(?:evaluate/)?oracle_all_correct_seen_n(\d+)$"), r"seen@\1"),
            (re.compile(r"^(?:evaluate/)?oracle_all_correct_holdout_n(\d+)$"), r"held@\1"),
            (re.compile(r"^(?:train_prior/)?val_loss_(text|image)$"), r"val \1"))
STAGE_ALIAS = {"train_prior": "prior", "train_dvae": "dvae", "train_clip": "clip",
               "evaluate": "eval", "generate": "gen", "tokenizer": "tok"}
LAST_SECTIONS = ("paths.", "tracking.")  # where runs differ without being a knob: shown last
RUN_CAP = 20
# Tried in turn until every column fits: (metric cap, param cap, column separator).
LAYOUTS = (((20, 14), "  "), ((14, 10), "  "), ((14, 10), " "))


@dataclass(frozen=True)
class Column:
    """One column: the full name (the legend), its header and a cell per run."""

    name: str
    header: str
    cells: list[str]
    optional: bool = True  # may be left out when the table is too wide

    @property
    def width(self) -> int:
        return max(len(c) for c in [self.header, *self.cells])


def _at_largest_n(name: str, present: set[str]) -> str:
    """`..._n32` as is when a run has it, else the same oracle figure at the largest N that a run
    has (a run with `generate.candidates` 4 or 64); other names as they are."""
    base, _sep, _n = name.rpartition("_n")
    if not base.endswith(("_seen", "_holdout")) or name in present:
        return name
    sizes = [int(k[len(base) + 2:]) for k in present
             if k.startswith(base + "_n") and k[len(base) + 2:].isdigit()]
    return f"{base}_n{max(sizes)}" if sizes else name


def default_metrics(runs: Sequence[RunRecord], stage: Optional[str] = None) -> list[str]:
    """The quality columns (+ wall): parent-run names, or for `stage` runs that stage's own; the
    oracle at N = 32, or at the largest N the runs have when none has 32."""
    present = {k for r in runs for k in r.metrics}
    if stage is None:
        return [_at_largest_n(name, present) for name, _ in QUALITY] + [WALL]
    own = [_at_largest_n(name.split("/", 1)[1], present) for name, _ in QUALITY
           if name.startswith(f"{stage}/")]
    if not any(m in present for m in own):  # a stage with no quality figure: its losses
        own = sorted(k for k in present if "loss" in k and not k.startswith("train_"))[:3]
    return own + [WALL]


def varying_params(runs: Sequence[RunRecord]) -> list[str]:
    """Params whose values differ between the runs (what a comparison is about); knobs first,
    paths and tracking settings last."""
    keys = sorted({k for r in runs for k in r.params})
    varying = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
    return sorted(varying, key=lambda k: k.startswith(LAST_SECTIONS))


def wall_seconds(run: RunRecord) -> Optional[float]:
    """Start to end of a run that has ended (a pipeline run ends with its last stage); while it
    runs, or when it has no end time, the sum of its stages' `stage_seconds` (None if none)."""
    if run.end_time and run.status != "RUNNING" and run.end_time >= run.start_time:
        return (run.end_time - run.start_time) / 1000
    parts = [v for k, v in run.metrics.items() if k == "stage_seconds" or k.endswith("/stage_seconds")]
    return sum(parts) if parts else None


def fmt_seconds(seconds: Optional[float]) -> str:
    """9m24s, 1h02m, 14s; `-` when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_value(value: Optional[float]) -> str:
    """A metric in 4 significant digits; `-` when the run lacks it."""
    return "-" if value is None else f"{value:.4g}"


def clip(text: str, cap: int) -> str:
    """`text` cut to `cap` characters, ending in `…` when cut."""
    return text if len(text) <= cap else text[:cap - 1] + "…"


def abbreviate(name: str, cap: int) -> str:
    """A dotted or slashed name shortened to `cap`: a known header (`SHORT`, `PATTERNS`); a
    metric's stage to its alias, then dropped (train_dvae/final_val_recon_mse ->
    dvae/final_val_recon_mse -> final_val_recon_mse); a
    param's leading sections to their first letter (data.synthetic.n_images -> d.s.n_images);
    then a cut in the middle."""
    if name in SHORT:
        return SHORT[name]
    for pattern, short in PATTERNS:
        if pattern.match(name):
            return pattern.sub(short, name)
    stage, slash, rest = name.partition("/")
    tries = [name, f"{STAGE_ALIAS.get(stage, stage)}/{rest}", rest] if slash else [name]
    parts = name.split(".")
    for i in range(len(parts) - 1):
        parts[i] = parts[i][:1]
        tries.append(".".join(parts))
    short = next((t for t in tries if len(t) <= cap), tries[-1])
    if len(short) <= cap:
        return short
    head = (cap - 1) // 2
    return short[:head] + "…" + short[len(short) - (cap - 1 - head):]


def run_label(run: RunRecord) -> str:
    """A pipeline run by its pipeline id (`dvc-<pid>-<start>`, `prefect-<flow run id>`), a stage
    run by its stage and the start of its run id."""
    if run.kind == "pipeline":
        return run.name.removeprefix("pipeline ")
    return f"{run.name} {run.run_id[:6]}"


def _started(run: RunRecord) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(run.start_time / 1000))


def columns(runs: Sequence[RunRecord], params: Sequence[str], metrics: Sequence[str],
            caps: tuple[int, int] = LAYOUTS[0][0]) -> list[Column]:
    """run, started, status, the metric columns, then the param columns (each at most `caps`
    = (metric, param) characters wide)."""
    metric_cap, param_cap = caps
    first = "pipeline" if runs and all(r.kind == "pipeline" for r in runs) else "run"
    cols = [Column("run", first, [clip(run_label(r), RUN_CAP) for r in runs], optional=False),
            Column("started", "started", [_started(r) for r in runs], optional=False),
            Column("status", "status", [r.status for r in runs], optional=False)]
    for m in metrics:
        cells = [fmt_seconds(wall_seconds(r)) if m == WALL else fmt_value(r.metrics.get(m))
                 for r in runs]
        cols.append(Column(m, abbreviate(m, metric_cap), cells))
    for p in params:
        cols.append(Column(p, abbreviate(p, param_cap),
                           [clip(r.params.get(p, "-"), param_cap) for r in runs]))
    return cols


def _total(cols: Sequence[Column], sep: str) -> int:
    return sum(c.width for c in cols) + len(sep) * (len(cols) - 1)


def fit(cols: list[Column], width: int, sep: str) -> tuple[list[Column], list[Column]]:
    """(shown, left out): optional columns are left out from the right until the table fits."""
    shown = list(cols)
    dropped: list[Column] = []
    while _total(shown, sep) > width:
        i = max((i for i, c in enumerate(shown) if c.optional), default=None)
        if i is None:
            break
        dropped.insert(0, shown.pop(i))
    return shown, dropped


def _legend(shown: Sequence[Column], dropped: Sequence[Column], width: int) -> list[str]:
    """Full names of abbreviated headers, and the columns that did not fit, wrapped to `width`."""
    notes = []
    named = [f"{c.header} = {c.name}" for c in shown
             if c.header != c.name and c.name not in (WALL, "run")]
    if any(c.name == WALL for c in shown):
        named.append("wall = the run's start to its end")
    if named:
        notes.append("columns: " + "; ".join(named))
    if dropped:
        notes.append(f"not shown (over {width} columns): " + ", ".join(c.name for c in dropped)
                     + "; choose columns with --metrics / --params")
    return [line for note in notes for line in textwrap.wrap(note, width, subsequent_indent="  ",
                                                             break_on_hyphens=False)]


def format_table(runs: Sequence[RunRecord], params: Sequence[str], metrics: Sequence[str],
                 width: int = 120) -> str:
    """The table, at most `width` characters a line: header, rule, a row per run, legend."""
    for caps, sep in LAYOUTS:  # crowded: narrower columns, then one space, before leaving any out
        cols = columns(runs, params, metrics, caps)
        if _total(cols, sep) <= width:
            break
    shown, dropped = fit(cols, width, sep)
    widths = [c.width for c in shown]
    rows = [[c.header for c in shown], ["-" * w for w in widths],
            *([c.cells[i] for c in shown] for i in range(len(runs)))]
    lines = [sep.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([*(line[:width] for line in lines), *_legend(shown, dropped, width)])
