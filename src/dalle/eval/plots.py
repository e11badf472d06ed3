"""Plot data for `dvc plots show` (plots/*.json) and the same figures as PNG for MLflow."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dalle.io import atomic_path, write_json


def write_plot_json(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """A list of flat records: DVC's JSON plot format (x/y chosen in dvc.yaml)."""
    return write_json(path, list(rows))


def line_png(path: Path, rows: Sequence[dict[str, Any]], x: str, ys: Sequence[str],
             series: str, title: str, logx: bool = False) -> Path:
    """One panel per y key; one line per value of `series`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.4), squeeze=False)
    groups = sorted({str(r[series]) for r in rows})
    for ax, y in zip(axes[0], ys):
        for g in groups:
            pts = sorted((r[x], r[y]) for r in rows if str(r[series]) == g and r.get(y) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=g, linestyle="-" if g in ("all", "seen") else "--")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
