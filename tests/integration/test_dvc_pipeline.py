"""The real dvc.yaml and stages on a TINY params set, in a temp git + DVC copy of the repo:
`dvc repro` runs every declared stage, a second repro does nothing, changing one param makes
exactly that stage stale and reruns only it and stages downstream, `dvc exp run -S` + `exp show`
and `dvc metrics show` work, and stages land in MLflow under one parent run per repro."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dalle import pipeline, runs, tracking
from dalle.catalog import template
from dalle.config import load_raw

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
# Tiny sizes for every section that exists; keys a section lacks are skipped (see _tiny_raw).
TINY = {
    "data.synthetic.n_images": 96, "data.shard_size": 48, "data.image_size": 32,
    "tokenizer.vocab_size": 128, "tokenizer.text_len": 16,
    "dvae.steps": 4, "dvae.batch_size": 8, "dvae.n_hid": 8, "dvae.dec_n_hid": 8,
    "dvae.vocab_size": 32, "dvae.log_every": 2, "dvae.checkpoint_every": 2,
    "prior.steps": 4, "prior.batch_size": 8, "prior.n_layers": 2, "prior.d_model": 32,
    "prior.n_heads": 2, "prior.log_every": 2, "prior.checkpoint_every": 2,
    "prior.sample_every": 1000, "prior.warmup_steps": 1,
    "clip.steps": 4, "clip.batch_size": 8, "clip.embed_dim": 16, "clip.text_width": 16,
    "clip.image_width": 8, "clip.text_layers": 1, "clip.text_heads": 2, "clip.log_every": 2,
    "clip.retrieval_candidates": 4,
    "generate.n_captions": 2, "generate.candidates": 2, "generate.keep": 1,
    "generate.batch_size": 4, "evaluate.blur_radii": [0, 2], "evaluate.rerank_sizes": [1, 2],
}
# One knob per stage whose change must rerun that stage (and only what is downstream of it).
# encode first: its batch size changes no token, so DVC reruns encode and then stops (train_prior's
# inputs hash the same) - the "exactly the affected stages" case, and the cheapest one.
KNOB = {"encode": ("encode.batch_size", 7), "train_clip": ("clip.lr", 0.002), "dedup": ("dedup.overlap_threshold", 7),
        "tokenizer": ("tokenizer.min_frequency", 1), "evaluate": ("evaluate.batch_size", 7),
        "collect": ("data.synthetic.jitter", 0.1)}


def _declared() -> list[str]:
    path = REPO / "dvc.yaml"
    return list((yaml.safe_load(path.read_text()) or {}).get("stages") or {}) if path.exists() else []


def _tiny_raw() -> dict:
    raw = load_raw(REPO / "params.yaml")
    for dotted, value in TINY.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {})
        if leaf in node:
            node[leaf] = value
    return raw


def _run(repo: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'mlflow.db'}", "DALLE_LOG_LEVEL": "WARNING"}
    env.pop(tracking.PIPELINE_ENV, None)
    out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _descendants(name: str) -> set[str]:
    return pipeline.descendants(name)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if not _declared():
        pytest.skip("dvc.yaml declares no stage yet")
    root = tmp_path_factory.mktemp("dvcrepo") / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for tree in ("stages", "src"):  # code deps (imports still resolve to the installed package)
        shutil.copytree(REPO / tree, root / tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "params.yaml").write_text(yaml.safe_dump(_tiny_raw(), sort_keys=False))
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    _run(root, "dvc", "config", "core.analytics", "false")
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def test_repro_idempotent_and_param_change_reruns_only_affected(repo) -> None:
    declared = _declared()
    ran = _ran(_run(repo, "dvc", "repro"))
    assert sorted(ran) == sorted(declared)
    for name in ran:  # in DAG order: every upstream stage ran before
        upstream = set(pipeline.upstream(pipeline.BY_NAME[name])) & set(declared)
        assert upstream <= set(ran[:ran.index(name)]), (name, ran)
    assert json.loads(_run(repo, "dvc", "status", "--json")) == {}
    assert _ran(_run(repo, "dvc", "repro")) == []  # a second repro does nothing
    _module_change_makes_its_importers_stale(repo)
    stage = next((s for s in KNOB if s in declared), declared[-1])
    key, value = KNOB[stage]
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    section, leaf = key.rsplit(".", 1)
    node = raw
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert set(json.loads(_run(repo, "dvc", "status", "--json"))) == {stage}
    ran = _ran(_run(repo, "dvc", "repro"))
    assert ran[0] == stage and set(ran) <= _descendants(stage), ran
    metrics = json.loads(_run(repo, "dvc", "metrics", "show", "--json"))
    assert metrics, "dvc metrics show found no metrics"

    db = f"sqlite:///{repo.parent / 'mlflow.db'}"
    parents = runs.search_runs("dalle", uri=db)
    assert len(parents) == 2 and all(p.status == "FINISHED" for p in parents)
    assert {r.stage for r in runs.search_runs("dalle", kind="stage", uri=db)} == set(declared)


def _module_change_makes_its_importers_stale(repo: Path) -> None:
    """Editing a library module makes exactly the stages that import it stale (dvc.yaml's code
    deps), and nothing else; undoing the edit makes the workspace clean again."""
    module = repo / "src" / "dalle" / "models" / "clip.py"
    original = module.read_text()
    importers = {name for name, entry in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items()
                 if "src/dalle/models/clip.py" in entry["deps"]}
    module.write_text(original + "\n# an edit\n")
    try:
        assert set(json.loads(_run(repo, "dvc", "status", "--json"))) == importers
    finally:
        module.write_text(original)
    assert importers == {"dedup", "train_clip", "generate", "evaluate"}
    assert json.loads(_run(repo, "dvc", "status", "--json")) == {}


def _readme_commands() -> list[str]:
    """The `dalle ...` lines of the README's every-day block, as a user would paste them."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Every day", 1)[1].split("```", 2)[1]
    return [line.split("#", 1)[0].strip() for line in block.splitlines()
            if line.strip().startswith("dalle ")]


def test_readme_every_day_commands_on_the_repro_outputs(repo) -> None:
    """What the README tells a user to type after `make repro` works on what `dvc repro` left:
    `dalle generate` (plain and primed with an image), `dalle config validate/show`, `dalle runs
    compare`, and `dvc status` is clean afterwards."""
    commands = _readme_commands()
    assert any(c.startswith("dalle generate") for c in commands), commands
    env_bin = str(VENV_BIN / "dalle")
    for command in commands:
        args = shlex.split(command)
        out = _run(repo, env_bin, *args[1:])
        if args[1] == "generate":
            png = repo / args[args.index("-o") + 1]
            assert png.is_file() and "wrote" in out
            prime = next((repo / "samples" / "images").glob("*.png"))
            _run(repo, env_bin, *args[1:-2], "--prime", str(prime), "--prime-rows", "2", "-o", "primed.png")
            assert (repo / "primed.png").is_file()
        if args[1:3] == ["config", "validate"]:
            assert out.strip().splitlines()[-1] == "ok"
    out = _run(repo, env_bin, "runs", "compare")
    assert "pipeline" in out and "FINISHED" in out
    for made in ("out.png", "primed.png"):
        (repo / made).unlink(missing_ok=True)
    assert json.loads(_run(repo, "dvc", "status", "--json")) == {}


def test_exp_run_and_show(repo) -> None:
    declared = _declared()
    stage = next((s for s in KNOB if s in declared), declared[-1])
    key, _ = KNOB[stage]
    value = 0.0005 if isinstance(KNOB[stage][1], float) else 5  # differs from the first test
    out = _run(repo, "dvc", "exp", "run", "-n", "tiny-exp", "-S", f"{key}={value}")
    assert stage in _ran(out)
    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    names = [r.get("name") for c in shown for e in (c.get("experiments") or []) for r in e["revs"]]
    assert "tiny-exp" in names


def _queue_settled(repo: Path, names: tuple[str, ...], timeout: float = 240) -> str:
    """Poll `dvc queue status` until none of `names` is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        status = _run(repo, "dvc", "queue", "status")
        rows = [line for line in status.splitlines() if any(n in line for n in names)]
        if rows and not any(w in line for line in rows for w in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout}s:\n{status}"
        time.sleep(2)


def _exp_metrics(shown: list, name: str, file: str) -> dict:
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name") == name:
                    found = (rev.get("data") or {}).get("metrics") or {}
                    return next(v["data"] for k, v in found.items() if k.endswith(file))
    raise AssertionError(f"experiment {name} not in dvc exp show")


def test_exp_queue_runs_two_experiments_tracked_apart(repo) -> None:
    """`dvc exp run --queue` x2 + `dvc queue start`: both finish in DVC's temp copies, show up in
    `dvc exp show` with their own metrics, and land as two pipeline runs in the absolute MLflow
    store (repo/../mlflow.db), not in the copies. The knob (sampling temperature) reruns only
    generate and evaluate."""
    if not {"generate", "evaluate"} <= set(_declared()):
        pytest.skip("dvc.yaml has no generate/evaluate stage")
    # a queued experiment starts from the last commit: commit dvc.lock + the git-tracked
    # metrics/plots of the runs above, so only the stages the knob touches rerun
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro")
    db = f"sqlite:///{repo.parent / 'mlflow.db'}"
    before = {p.run_id for p in runs.search_runs("dalle", uri=db)}
    names = (("q-cold", "0.25"), ("q-hot", "4.0"))
    for name, temp in names:
        _run(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"generate.temperature={temp}")
    _run(repo, "dvc", "queue", "start", "-j", "1")
    status = _queue_settled(repo, tuple(n for n, _ in names))
    assert status.count("Success") >= 2, status
    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    cold, hot = (_exp_metrics(shown, n, "eval.json") for n, _ in names)
    assert cold != hot and cold.keys() == hot.keys(), (cold, hot)

    new = [p for p in runs.search_runs("dalle", uri=db) if p.run_id not in before]
    assert sorted(p.params["generate.temperature"] for p in new) == sorted(t for _, t in names), new
    assert all(p.status == "FINISHED" for p in new)
    stages = {r.stage for r in runs.search_runs("dalle", kind="stage", uri=db)
              if r.params.get("generate.temperature") in {t for _, t in names}}
    # nothing upstream of generate reran: every out under the git-ignored models/ is in DVC's
    # cache (dvc.yaml), so the queue's copy of the workspace gets it back by checkout
    assert stages == {"generate", "evaluate"}, stages
    assert not list(repo.rglob("mlflow.db")), "tracking went into the repo (or a temp copy)"


def _json_head(output: str) -> object:
    """The JSON document DVC prints first (a warning about the metric-less first commit follows)."""
    return json.JSONDecoder().raw_decode(output.lstrip())[0]


def test_metrics_and_plots_show_and_diff(repo) -> None:
    """`dvc metrics show/diff` and `dvc plots show/diff` present the stage metrics and curves
    (dVAE, prior, reranker losses; FID/IS vs blur radius and rerank size), as JSON."""
    declared = _declared()
    metrics = json.loads(_run(repo, "dvc", "metrics", "show", "--json"))
    files = {f for rev in metrics.values() for f in (rev.get("data") or {})}
    art = template()
    for stage in ("train_dvae", "train_prior", "evaluate"):
        if stage in declared:
            wanted = [str(o.path).split("}/", 1)[-1] for o in pipeline.BY_NAME[stage].outputs(art)
                      if o.metric]
            assert any(f.endswith(w) for f in files for w in wanted), (stage, files)
    first = _run(repo, "git", "rev-list", "--max-parents=0", "HEAD").split()[0]  # before any run
    diff = _json_head(_run(repo, "dvc", "metrics", "diff", first, "--json"))
    assert diff, "dvc metrics diff <first commit> shows nothing"
    shown = json.dumps(_json_head(_run(repo, "dvc", "plots", "show", "--json")))
    diffed = json.dumps(_json_head(_run(repo, "dvc", "plots", "diff", first, "--json")))
    for title in ("dVAE training", "prior training", "FID vs blur radius", "FID vs rerank size"):
        assert title in shown and title in diffed, (title, shown[:2000])
