"""`python -m tests.reliability.mlflow_writer PARAMS STAGE STEPS`: one tracked stage run (the real
`dalle.tracking.stage_run`, as every stage opens it) logging STEPS metric steps and a model file,
used to run several at once against one sqlite MLflow database."""
from __future__ import annotations

import sys
from pathlib import Path

from dalle.config import load_params
from dalle.tracking import stage_run


def main(params_path: str, stage: str, steps: int) -> None:
    params = load_params(params_path)
    with stage_run(stage, params) as tracker:
        for step in range(steps):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "step_value": float(step)}, step=step)
        tracker.log_params({"writer": stage})
        model = Path(params.paths.models) / f"{stage}.txt"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_text(stage)
        tracker.register_model(f"reliability-{stage}", [model], description=stage)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
