"""`dalle generate --model models:/dalle-prior@good`: the prior comes from the MLflow registry
(registered the way train_prior registers it); an unknown model is one error line."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dalle import tracking
from dalle.config import load_params
from tests.integration.test_prior_generate import gen, models  # noqa: F401 - fixture reuse

REPO = Path(__file__).resolve().parents[2]


def test_generate_from_registry(models: Path, tmp_mlflow: str, tmp_path, monkeypatch,  # noqa: F811
                                capsys) -> None:
    monkeypatch.chdir(tmp_path)
    src = models / "models"
    (src / "prior.json").write_text("{}")  # train_prior registers weights + config JSON
    with tracking.stage_run("train_prior", load_params(REPO / "params.yaml")) as t:
        assert t.register_model("dalle-prior", [src / "prior.safetensors", src / "prior.json"]) == "1"
    out = tmp_path / "reg.png"
    assert gen(models, "a red circle", "--candidates", "2", "--model", "models:/dalle-prior@good",
               "-o", str(out)) == 0
    assert Image.open(out).size == (2 * 16, 16)
    with pytest.raises(SystemExit) as exc:
        gen(models, "a red circle", "--model", "models:/nope@good", "-o", str(out))
    assert exc.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "models:/nope@good' is not in the registry" in err[0], err
