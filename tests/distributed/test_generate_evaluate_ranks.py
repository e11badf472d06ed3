"""`generate` and `evaluate` split over two Horovod ranks (`distributed.num_proc: 2`, the stages
relaunch themselves under horovodrun) write what one process writes: byte-identical candidates,
PNGs and index; the same metrics, plot data and plots apart from the timing fields."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle.io import save_checkpoint
from tests.helpers import stage_main

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
WORLD = {"tracking.enabled": "false", "data.image_size": 16, "data.synthetic.n_images": 120,
         "data.shard_size": 60, "data.eval_captions": 4, "tokenizer.vocab_size": 128,
         "tokenizer.min_frequency": 1, "dvae.vocab_size": 32, "dvae.n_hid": 8, "dvae.dec_n_hid": 8,
         "dvae.n_init": 8, "dvae.group_count": 3, "prior.n_layers": 2, "prior.d_model": 32,
         "prior.n_heads": 2, "prior.conv_kernel": 3, "clip.embed_dim": 16, "clip.image_width": 8,
         "clip.text_width": 16, "clip.text_layers": 1, "clip.text_heads": 2, "clip.steps": 4,
         "clip.batch_size": 8, "clip.log_every": 2, "clip.retrieval_candidates": 4,
         "generate.n_captions": 3, "generate.candidates": 4, "generate.keep": 2,
         "generate.batch_size": 8, "evaluate.rerank_sizes": "[1,2,4]", "evaluate.blur_radii": "[0,2]"}
TIMING = {"seconds", "stage_seconds", "reference_matmul_gflops"}  # wall clock, not output


def _sets(root: Path, out: str, **extra: object) -> list[str]:
    sets = {**WORLD, **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "tokens", "models")},
            **{f"paths.{k}": root / out / k for k in ("samples", "metrics", "plots")},
            "evaluate.cache_dir": root / out / "cache", **extra}
    return [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]


def _run(name: str, root: Path, out: str, num_proc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
               OMP_NUM_THREADS="1", HOROVOD_GLOO_TIMEOUT_SECONDS="60")
    env.pop("HOROVOD_RANK", None)
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", str(REPO / "params.yaml"),
           *_sets(root, out, **{"distributed.num_proc": num_proc})]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def _stage(name: str, root: Path, out: str, num_proc: int) -> str:
    proc = _run(name, root, out, num_proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _random_dvae_and_prior(root: Path) -> None:
    """Untrained dVAE and prior, written as their stages write them (config in the metadata)."""
    from dalle.catalog import Artefacts
    from dalle.config import load_params
    from dalle.models import dvae as D
    from dalle.models import transformer as T
    from dalle.models.config import from_section
    from dalle.runner import parse_stage_args

    ns = parse_stage_args("x", ["--params", str(REPO / "params.yaml"), *_sets(root, "base")])
    p = load_params(ns.params, None, ns.overrides)
    art = Artefacts(p.paths)
    torch.manual_seed(0)
    dvae = D.DiscreteVAE(from_section(D.DVAEConfig, p.dvae, image_size=p.data.image_size))
    save_checkpoint(art.dvae, dvae.state_dict(), D.dvae_config_dict(dvae))
    prior = T.DalleTransformer(from_section(T.PriorConfig, p.prior, text_vocab=p.tokenizer.vocab_size,
                                            text_len=p.tokenizer.text_len, image_vocab=p.dvae.vocab_size,
                                            grid=dvae.config.grid))
    save_checkpoint(art.prior, prior.state_dict(), T.prior_config_dict(prior))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _json(path: Path) -> object:
    value = json.loads(path.read_text())
    return {k: v for k, v in value.items() if k not in TIMING} if isinstance(value, dict) else value


def test_two_ranks_write_what_one_process_writes(tmp_path: Path) -> None:
    args = ["--params", str(REPO / "params.yaml"), *_sets(tmp_path, "base")]
    for stage in ("collect", "dedup", "prepare", "tokenizer", "train_clip"):
        stage_main(stage)(args)
    _random_dvae_and_prior(tmp_path)
    # seen and holdout, 3 captions each: 3 chunks of 2 (batch 8 // 4 candidates), 2 on rank 0;
    # evaluate: 3 rerank sizes x 2 reference sets + 3 x 2 caption kinds + 2 radii x 2 + 3 oracle
    assert "6 captions in 3 chunks over 1 rank(s)" in _stage("generate", tmp_path, "one", 1)
    assert "6 captions in 3 chunks over 2 rank(s)" in _stage("generate", tmp_path, "two", 2)
    assert "19 FID/IS and oracle jobs over 1 rank(s)" in _stage("evaluate", tmp_path, "one", 1)
    assert "19 FID/IS and oracle jobs over 2 rank(s)" in _stage("evaluate", tmp_path, "two", 2)
    one, two = _files(tmp_path / "one" / "samples"), _files(tmp_path / "two" / "samples")
    captions = json.loads((tmp_path / "one" / "metrics" / "generate.json").read_text())["captions"]
    assert captions == 6 and "candidates.npz" in one
    assert sum(k.startswith("images/") for k in one) == captions * 2
    assert one.keys() == two.keys()
    for name in one:  # candidates, index, kept PNGs and grids
        assert one[name] == two[name], name
    metrics = sorted(p.name for p in (tmp_path / "one" / "metrics").iterdir())
    assert metrics == sorted(p.name for p in (tmp_path / "two" / "metrics").iterdir())
    for name in ("generate.json", "eval.json"):
        assert _json(tmp_path / "one" / "metrics" / name) == _json(tmp_path / "two" / "metrics" / name)
    plots = _files(tmp_path / "one" / "plots")
    assert sorted(plots) == sorted(_files(tmp_path / "two" / "plots"))
    for name, data in plots.items():  # plot rows (json) and the PNGs drawn from them
        assert data == (tmp_path / "two" / "plots" / name).read_bytes(), name
    shutil.rmtree(tmp_path / "raw")  # the shards are the bulk of the world


def test_missing_input_is_one_error_line_before_any_launch(tmp_path: Path) -> None:
    for stage, message in (("generate", "eval_captions.parquet does not exist"),
                           ("evaluate", "candidates.npz is missing")):
        proc = _run(stage, tmp_path, "none", 2)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and message in lines[0], lines
        assert "[1]<" not in proc.stdout + proc.stderr
