"""train_dvae and train_clip data-parallel over two Horovod ranks (`distributed.num_proc: 2`, the
stage relaunches itself under horovodrun, as under `dvc repro`) end with the weights one process
gets from the same global batches, to float rounding; rank 1 writes nothing of its own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle.io import load_checkpoint
from tests.helpers import stage_main

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4  # float rounding of the gradient sums, through a few AdamW steps
WORLD = {"tracking.enabled": "false", "data.synthetic.n_images": 48, "data.image_size": 16,
         "data.shard_size": 24, "tokenizer.vocab_size": 300, "tokenizer.text_len": 24,
         "tokenizer.min_frequency": 1}
DVAE = {"dvae.vocab_size": 32, "dvae.n_hid": 8, "dvae.dec_n_hid": 8, "dvae.n_init": 8,
        "dvae.group_count": 3, "dvae.n_blk_per_group": 1, "dvae.steps": 6, "dvae.batch_size": 8,
        "dvae.log_every": 2, "dvae.checkpoint_every": 3, "dvae.ema_decay": 0.0,
        "dvae.random_crop": 0.75, "dvae.precision": "fp32", "dvae.device": "cpu", "dvae.threads": 1}


def _sets(root: Path, out: str, **extra: object) -> list[str]:
    sets = {**WORLD, **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "tokens")},
            **{f"paths.{k}": root / out / k for k in ("metrics", "models", "plots")}, **extra}
    return [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]


def _stage(name: str, root: Path, out: str, num_proc: int, **extra: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
               OMP_NUM_THREADS="1")
    env.pop("HOROVOD_RANK", None)
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", str(REPO / "params.yaml"),
           *_sets(root, out, **{"distributed.num_proc": num_proc, **extra})]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp_world")
    for stage in ("collect", "dedup", "prepare", "tokenizer"):
        stage_main(stage)(["--params", str(REPO / "params.yaml"), *_sets(root, "base")])
    return root


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)[0], load_checkpoint(b)[0]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _one_and_two(world: Path, stage: str, model: str, **extra: object) -> float:
    """Run `stage` on 1 then 2 processes; the max |difference| of the exported weights."""
    one = _stage(stage, world, f"{stage}1", 1, **extra)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _stage(stage, world, f"{stage}2", 2, **extra)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[1]<" in two.stdout + two.stderr  # horovodrun's prefix of rank 1's output
    assert _files(world / f"{stage}1") == _files(world / f"{stage}2")  # no rank-1 files, no state left
    diff = _max_diff(world / f"{stage}1" / "models" / model, world / f"{stage}2" / "models" / model)
    print(f"{stage}: max |np1 - np2| = {diff:.3g}")
    return diff


def test_dvae_two_ranks_match_one_process(world: Path) -> None:
    """In memory, with random crops, gumbel noise and the batch codebook-usage term."""
    assert _one_and_two(world, "train_dvae", "dvae.safetensors", **DVAE) < TOL


def test_batch_that_does_not_split_is_one_error_line(world: Path) -> None:
    proc = _stage("train_dvae", world, "odd", 2, **{**DVAE, "dvae.batch_size": 7})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dvae.batch_size 7 does not divide"), lines
    assert "[1]<" not in proc.stdout + proc.stderr  # refused before any launch


def test_dvae_streams_on_two_ranks(world: Path) -> None:
    """The streaming path (each rank its own share of the epoch) runs and exports on rank 0."""
    proc = _stage("train_dvae", world, "stream", 2, **{**DVAE, "loader.in_memory_max_mb": 0,
                                                       "loader.workers": 0, "loader.chunk": 8})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (world / "stream" / "models" / "dvae.safetensors").exists()
    weights = load_checkpoint(world / "stream" / "models" / "dvae.safetensors")[0]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
