"""Stand-in stage scripts for the flow tests: real `stage_main` entry points with tiny bodies
(log a metric curve, write a marker), so orchestration is tested without training anything."""
from __future__ import annotations

import textwrap
from pathlib import Path

STAGE = textwrap.dedent("""
    from pathlib import Path
    from dalle.runner import stage_main

    def body(params, tracker):
        flaky = Path("collect.flaky")
        if "{name}" == "collect" and flaky.exists():
            flaky.unlink()
            raise ConnectionError("transient network error")
        with open("order.log", "a") as fh:
            fh.write("{name}\\n")
        for step in range(3):
            tracker.log_metrics({{"loss": 1.0 / (step + 1)}}, step=step)
        return {{"loss": 1 / 3, "n_layers": params.prior.n_layers, "seen": "{name}"}}

    if __name__ == "__main__":
        stage_main("{name}", body)
    """)


def write_standins(workdir: Path, names: tuple[str, ...] = ("collect", "dedup", "evaluate")) -> None:
    (workdir / "stages").mkdir(parents=True, exist_ok=True)
    for name in names:
        (workdir / "stages" / f"{name}.py").write_text(STAGE.format(name=name))
