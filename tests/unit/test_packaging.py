"""The install is pinned: every dependency and every extra of pyproject.toml is in
requirements.lock (so `pip install '.[openai]'` gets the versions the suite ran with), and no
declared dependency is left unused by the code."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPORT_NAME = {"pillow": "PIL", "pyyaml": "yaml", "torch-fidelity": "torch_fidelity",
               "open-clip-torch": "open_clip", "dall-e": "dall_e",
               # used without an import statement of ours:
               "fastapi": None,  # pinned below 0.155 for Prefect's server
               "torchvision": None,  # torch-fidelity's feature extractors import it
               "pyarrow": None,  # pandas' parquet engine
               "dvc": None}  # the `dvc` command runs the DAG


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_dependency_and_extra_is_pinned_in_the_lock() -> None:
    locked = {_name(line) for line in (REPO / "requirements.lock").read_text().splitlines()
              if line and not line.startswith("#")}
    declared = [*_project()["dependencies"], *(r for extra in _project()["optional-dependencies"].values()
                                               for r in extra)]
    missing = sorted({_name(r) for r in declared} - locked)
    assert not missing, f"not pinned in requirements.lock: {missing} (re-freeze the venv)"


def test_every_direct_dependency_is_imported_somewhere() -> None:
    code = "\n".join(p.read_text() for d in ("src", "flows", "tests", "scripts")
                     for p in (REPO / d).rglob("*.py"))
    unused = []
    for requirement in _project()["dependencies"]:
        name = _name(requirement)
        module = IMPORT_NAME.get(name, name.replace("-", "_"))
        if module and not re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", code, re.M):
            unused.append(name)
    assert not unused, f"declared but never imported: {unused}"
