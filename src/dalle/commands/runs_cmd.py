"""`dalle runs compare [--experiment NAME] [--stage S] [--metrics a,b] [--params x,y] [--plot out.png]`.

Prints a table of MLflow runs (newest first) that leads with quality and fits a 120-column
terminal (`dalle.commands.runs_table`): by default the pipeline (parent) runs with the samples'
oracle all-correct at N = 32 on seen and held-out captions, the prior's val loss, the dVAE's
oracle on val reconstructions, CLIP top-1 and the wall time, then the params that differ between
the runs. `--metrics`/`--params` choose other columns (full MLflow names, e.g.
`train_prior/val_loss_image`); `--stage train_prior` compares that stage's runs instead. `--plot`
draws one curve per run of a stage metric (by step) into a PNG.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from dalle.commands.runs_table import WALL, default_metrics, format_table, varying_params
from dalle.errors import OutputError
from dalle.runs import RunRecord, metric_history, search_runs
from dalle.tracking import default_uri

_METRIC_HINTS = ("loss", "fid", "is_", "inception", "accuracy", "bpd", "oracle", "recall")


def key_metrics(runs: Sequence[RunRecord], limit: int = 8) -> list[str]:
    """The most informative metric names present (losses, FID, oracle, ...): the `--plot` default."""
    present = sorted({k for r in runs for k in r.metrics})
    hinted = [k for k in present if any(h in k.lower() for h in _METRIC_HINTS)]
    rest = [k for k in present if k not in hinted]
    return (hinted + rest)[:limit]


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def unknown_metric_notes(runs: Sequence[RunRecord], wanted: Sequence[str]) -> list[str]:
    """A note for each requested metric no run has, with the nearest names that exist."""
    present = sorted({k for r in runs for k in r.metrics})
    notes = []
    for name in wanted:
        if name != WALL and name not in present:
            near = difflib.get_close_matches(name, present, n=1, cutoff=0.5)
            notes.append(f"note: no run shown has metric {name!r}"
                         + (f"; did you mean {near[0]}?" if near else ""))
    return notes


def plot_curves(runs: Sequence[RunRecord], metric: str, out: Path, uri: str) -> int:
    """One line per run of `metric` vs step; returns how many runs had the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    drawn = 0
    for r in runs:
        points = metric_history(r.run_id, metric, uri=uri)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=f"{r.name} {r.run_id[:6]}")
            drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: {drawn} run(s)")
    if drawn:
        ax.legend(fontsize=7)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return drawn


def _compare(args: argparse.Namespace) -> int:
    uri = args.tracking_uri or default_uri()
    kind = "stage" if args.stage else "pipeline"
    runs = search_runs(args.experiment, kind=kind, stage=args.stage, max_results=args.max_runs, uri=uri)
    if not runs:
        print(f"no {kind} runs in experiment {args.experiment!r}")
        return 0
    params = _names(args.params) if args.params else varying_params(runs)
    metrics = _names(args.metrics) if args.metrics else default_metrics(runs, args.stage)
    print(format_table(runs, params, metrics, width=args.width))
    for note in unknown_metric_notes(runs, metrics if args.metrics else ()):
        print("\n".join(textwrap.wrap(note, args.width, subsequent_indent="  ")), file=sys.stderr)
    if args.plot:
        stage = args.stage or "train_prior"
        stage_runs = runs if args.stage else search_runs(args.experiment, "stage", stage,
                                                         args.max_runs, uri)
        curve = args.curve or next(iter(key_metrics(stage_runs)), "loss")
        drawn = plot_curves(stage_runs, curve, Path(args.plot), uri)
        print(f"wrote {args.plot} ({curve} of {drawn} {stage} run(s))")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="compare tracked MLflow runs")
    actions = runs.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    cmp = actions.add_parser("compare", help="table of runs: quality, wall time, differing params")
    cmp.add_argument("--experiment", default="dalle", help="MLflow experiment (default dalle)")
    cmp.add_argument("--stage", default=None, help="compare runs of one stage, e.g. train_prior")
    cmp.add_argument("--params", default=None,
                     help="comma-separated param columns (default: those that differ between the runs)")
    cmp.add_argument("--metrics", default=None,
                     help="comma-separated metric columns, full MLflow names, e.g. "
                          "train_prior/val_loss_image,evaluate/fid_all_n32 (wall: the run's duration)")
    cmp.add_argument("--width", type=int, default=120, help="widest line printed (default 120)")
    cmp.add_argument("--max-runs", type=int, default=20, help="newest N runs (default 20)")
    cmp.add_argument("--plot", default=None, metavar="PNG", help="write the runs' curves here")
    cmp.add_argument("--curve", default=None, help="metric to plot (default: the stage's loss)")
    cmp.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or mlflow.db")
    cmp.set_defaults(func=_compare)
