"""The stage contract: each stage declared once (dalle.pipeline.STAGES), dvc.yaml generated from
the declarations and current, code deps that cover what a stage really imports, artefact names
spelled once, and an import graph without cycles or upward arrows from models/."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dalle import pipeline
from dalle.catalog import template
from dalle.dvcgen import SRC, imported_modules, module_closure, render

REPO = Path(__file__).resolve().parents[2]


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_committed_dvc_yaml_is_the_generated_one() -> None:
    assert (REPO / "dvc.yaml").read_text() == render(pipeline.STAGES, REPO), \
        "dvc.yaml is stale: run `dalle dvc-yaml` and commit it"


def test_stage_scripts_only_run_their_declaration() -> None:
    for spec in pipeline.STAGES:
        tree = ast.parse((REPO / "stages" / f"{spec.name}.py").read_text())
        body = [n for n in tree.body if not isinstance(n, ast.Expr)]  # the docstring
        assert len(body) == 2 and isinstance(body[0], ast.ImportFrom), spec.name
        assert [a.name for a in body[0].names] == ["STAGE"], spec.name
        assert ast.unparse(body[1]) == "if __name__ == '__main__':\n    STAGE.main()", spec.name
    assert sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__") == \
        sorted(pipeline.BY_NAME)


def _runtime_modules(name: str) -> set[str]:
    """The src/dalle files a `python -m stages.<name>` process has imported once its stage
    module is loaded (what DVC must hash), measured in a fresh interpreter."""
    code = (f"import sys, json; import stages.{name}; "
            "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) "
            "if getattr(m, '__file__', None) and '/src/dalle/' in m.__file__)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return {str(Path(f).resolve().relative_to(REPO)) for f in json.loads(out.stdout)}


@pytest.mark.parametrize("name", ["collect", "train_dvae", "train_prior", "evaluate"])
def test_code_deps_cover_every_module_the_stage_imports(name: str) -> None:
    deps = set(_dvc_stages()[name]["deps"])
    missing = _runtime_modules(name) - deps
    assert not missing, f"{name} imports {sorted(missing)} but dvc.yaml does not list them"


def test_data_deps_are_the_upstream_outputs() -> None:
    art = template()
    for spec in pipeline.STAGES:
        entry = _dvc_stages()[spec.name]
        for path in spec.inputs(art):
            assert str(path) in entry["deps"], (spec.name, path)
    assert pipeline.upstream(pipeline.BY_NAME["train_prior"]) == ("tokenizer", "encode")
    assert "train_prior" in pipeline.upstream(pipeline.BY_NAME["generate"])
    assert pipeline.descendants("train_clip") == {"train_clip", "generate", "evaluate"}
    seen: set[str] = set()
    for spec in pipeline.STAGES:  # declared in DAG order
        assert set(pipeline.upstream(spec)) <= seen, spec.name
        seen.add(spec.name)


def test_a_module_makes_exactly_its_importers_stale() -> None:
    """Which stages list a module is which stages import it: models/clip.py is read by dedup
    (its optional embedding overlap), train_clip, generate and evaluate - not by the dVAE."""
    listing = {n: set(e["deps"]) for n, e in _dvc_stages().items()}
    users = {n for n, deps in listing.items() if "src/dalle/models/clip.py" in deps}
    assert users == {"dedup", "train_clip", "generate", "evaluate"}
    assert {n for n, deps in listing.items() if "src/dalle/models/transformer.py" in deps} == {
        "train_prior", "generate"}
    assert all("src/dalle/stage.py" in deps for deps in listing.values())


def _graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    name = {f: ".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
            for f in files}
    return {name[f]: {m for m in imported_modules(f) if m != name[f]} for f in files}


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    packages = {m for m in graph if (SRC.parent / m.replace(".", "/") / "__init__.py").is_file()}
    edges = {m: {d for d in deps if d not in packages} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_models_import_nothing_above_them() -> None:
    allowed = ("dalle.models", "dalle.errors", "dalle.io")
    for module, deps in _graph().items():
        if module.startswith("dalle.models"):
            upward = {d for d in deps if d != "dalle" and not d.startswith(allowed)}
            assert not upward, f"{module} imports {sorted(upward)}"


def _strings(path: Path) -> str:
    """Every string constant of a file (docstrings and f-string pieces included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return "\n".join(n.value for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_each_artefact_name_is_spelled_once() -> None:
    """Only the catalog names the files that pass between stages (in code and docstrings)."""
    names = ["manifest.parquet", "eval_captions.parquet", "overlap.parquet", "tokenizer.json",
             "dvae.safetensors", "dvae_recon.png", "dvae_train_state", "prior.safetensors",
             "prior.ckpt", "clip.safetensors", "clip.state", "candidates.npz", "index.parquet",
             ".prior_samples", "prior_loss.json", "fid_blur.json", "fid_rerank.json",
             "oracle_rerank.json", "samples.png"]
    texts = {p: _strings(p) for d in ("src", "stages", "flows") for p in (REPO / d).rglob("*.py")}
    for name in names:
        where = [str(p.relative_to(REPO)) for p, t in texts.items() if name in t]
        assert where == ["src/dalle/catalog.py"], (name, where)


def test_stage_closure_of_a_module_is_stable() -> None:
    closure = [str(p.relative_to(REPO)) for p in module_closure(REPO / "stages" / "tokenizer.py")]
    assert "src/dalle/data/tokenizer.py" in closure and "src/dalle/train/prior.py" not in closure
