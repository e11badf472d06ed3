"""Import boundaries (docs/architecture.md): prefect only in flows/, horovod only in distributed/horovod.py, mlflow only in
tracking.py. Checked on the source text of every Python file of the project."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {
    # scripts/screenshots.py drives a Prefect server for docs/img; it is tooling, not the pipeline
    "prefect": lambda rel: rel.startswith("flows/") or rel == "scripts/screenshots.py",
    "horovod": lambda rel: rel == "src/dalle/distributed/horovod.py",
    "mlflow": lambda rel: rel == "src/dalle/tracking.py",
}
SCANNED = ("src", "stages", "flows", "scripts")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value).split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value).split(".")[0])
    return found


def _files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)


def test_there_is_something_to_scan() -> None:
    rels = {str(p.relative_to(REPO)) for p in _files()}
    assert "src/dalle/tracking.py" in rels and "src/dalle/config.py" in rels


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_boundary(module: str) -> None:
    offenders = []
    for path in _files():
        rel = str(path.relative_to(REPO))
        if module in _imports(path) and not ALLOWED[module](rel):
            offenders.append(rel)
    assert not offenders, f"{module} imported outside its module: {offenders}"


def test_checker_sees_lazy_imports(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import mlflow.tracking\n    from horovod import torch\n")
    assert {"mlflow", "horovod"} <= _imports(probe)
