"""`dalle runs compare [--experiment NAME] [--stage S] [--plot out.png]`.

Prints a table of MLflow runs (newest first) with their key params and metrics: by default the
pipeline (parent) runs, whose metrics are the stages' final values (`train_prior/loss`, ...);
`--stage train_prior` compares that stage's runs instead. `--plot` draws one curve per run of a
stage metric (by step) into a PNG.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from dalle.errors import OutputError
from dalle.runs import RunRecord, metric_history, search_runs
from dalle.tracking import default_uri

KEY_PARAMS = ("data.synthetic.n_images", "dvae.vocab_size", "dvae.steps", "prior.n_layers",
              "prior.d_model", "prior.attention", "prior.steps", "generate.candidates", "seed")
_METRIC_HINTS = ("loss", "fid", "is_", "inception", "accuracy", "bpd", "oracle", "recall")


def key_metrics(runs: Sequence[RunRecord], wanted: Sequence[str] = (), limit: int = 8) -> list[str]:
    """The metric columns: the requested ones, else the most informative names present."""
    present = sorted({k for r in runs for k in r.metrics})
    if wanted:
        return [k for k in wanted if k in present] or list(wanted)
    hinted = [k for k in present if any(h in k.lower() for h in _METRIC_HINTS)]
    rest = [k for k in present if k not in hinted]
    return (hinted + rest)[:limit]


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(runs: Sequence[RunRecord], params: Sequence[str], metrics: Sequence[str]) -> str:
    """A fixed-width text table: run, started, status, then one column per param and metric."""
    header = ["run", "started", "status", *params, *metrics]
    rows = [[r.name[:28], time.strftime("%m-%d %H:%M", time.localtime(r.start_time / 1000)),
             r.status, *(r.params.get(p, "-") for p in params),
             *(_fmt(r.metrics.get(m)) for m in metrics)] for r in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def varying_params(runs: Sequence[RunRecord], limit: int = 6) -> list[str]:
    """Params whose values differ between the runs (what a comparison is about)."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1][:limit]


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
    params = args.params.split(",") if args.params else [
        p for p in dict.fromkeys([*KEY_PARAMS, *varying_params(runs)]) if any(p in r.params for r in runs)]
    metrics = key_metrics(runs, args.metrics.split(",") if args.metrics else ())
    print(format_table(runs, params, metrics))
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
    cmp = actions.add_parser("compare", help="table of runs with key params and metrics")
    cmp.add_argument("--experiment", default="dalle", help="MLflow experiment (default dalle)")
    cmp.add_argument("--stage", default=None, help="compare runs of one stage, e.g. train_prior")
    cmp.add_argument("--params", default=None, help="comma-separated param columns")
    cmp.add_argument("--metrics", default=None, help="comma-separated metric columns")
    cmp.add_argument("--max-runs", type=int, default=20, help="newest N runs (default 20)")
    cmp.add_argument("--plot", default=None, metavar="PNG", help="write the runs' curves here")
    cmp.add_argument("--curve", default=None, help="metric to plot (default: the stage's loss)")
    cmp.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or mlflow.db")
    cmp.set_defaults(func=_compare)
