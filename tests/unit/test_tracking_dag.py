"""The DAG declared twice, kept in step: dvc.yaml (DVC) and dalle.pipeline.STAGES (Prefect);
and dalle.pipeline.stage_body takes the body from a stage script without running it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dalle import pipeline
from dalle.config import load_params
from dalle.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _dvc_stages() -> dict:
    path = REPO / "dvc.yaml"
    return yaml.safe_load(path.read_text())["stages"] if path.exists() else {}


def _resolve(entry, paths) -> str:
    text = next(iter(entry)) if isinstance(entry, dict) else entry
    for key, value in paths.model_dump().items():
        text = text.replace(f"${{paths.{key}}}", value)
    return text


def test_dvc_yaml_matches_the_registry() -> None:
    paths = load_params(REPO / "params.yaml").paths
    declared = _dvc_stages()
    assert set(declared) <= set(pipeline.BY_NAME), set(declared) - set(pipeline.BY_NAME)
    for name, stage in declared.items():
        spec = pipeline.BY_NAME[name]
        assert stage["cmd"] == f"python -m stages.{name}"
        assert (REPO / "stages" / f"{name}.py").is_file(), f"{name}: declared but no script"
        assert f"stages/{name}.py" in stage["deps"]
        outs = {_resolve(o, paths) for o in stage.get("outs", [])}
        assert set(spec.outs(paths)) <= outs, (name, outs)
        deps = {_resolve(d, paths) for d in stage["deps"]}
        for up in spec.upstream:
            if up in declared:  # every upstream stage feeds this one through one of its outs
                assert deps & set(pipeline.BY_NAME[up].outs(paths)), (name, up)
        if spec.metrics and "metrics" in stage:
            metrics = {_resolve(m, paths) for m in stage["metrics"]}
            assert f"{paths.metrics}/{spec.metrics}" in metrics


def test_registry_is_topologically_ordered() -> None:
    seen: set[str] = set()
    for spec in pipeline.STAGES:
        assert set(spec.upstream) <= seen, spec.name
        seen.add(spec.name)


def test_stage_body_is_recorded_not_run(tmp_path, monkeypatch) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "dedup.py").write_text(
        "import sys\nfrom dalle.runner import stage_main\n"
        "def main(argv=None):\n    return stage_main('dedup', lambda p, t: {'seed': p.seed}, argv)\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n")
    (tmp_path / "stages" / "collect.py").write_text("print('no stage_main here')\n")
    monkeypatch.chdir(tmp_path)
    body = pipeline.stage_body("dedup")
    import dalle.runner

    assert dalle.runner.stage_main.__name__ == "stage_main"  # restored
    assert body(load_params(REPO / "params.yaml"), None) == {"seed": 0}
    assert [s.name for s in pipeline.available()] == ["collect", "dedup"]
    with pytest.raises(ConfigError, match="does not call stage_main"):
        pipeline.stage_body("collect")
    with pytest.raises(ConfigError, match="no script"):
        pipeline.stage_body("encode")
    with pytest.raises(ConfigError, match="unknown stage 'decode'"):
        pipeline.select(["decode"])
    assert pipeline.json_safe({"a": float("1.5"), "p": Path("x")}) == {"a": 1.5, "p": "x"}
