"""Peak RSS of the image stages does not grow with the collection: the same stages on a synthetic
world of 500 and of 5,000 images (64 px), each stage in its own process, streaming from the clean
shards; and, as the control that shows the measurement can see growth, the in-memory path on
the same two worlds does grow (by about the decoded train split, ~40 MB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import stage_main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STAGES = ("train_dvae", "encode", "train_clip", "train_prior", "generate", "evaluate")
MEASURED = ("train_dvae", "encode", "train_clip", "generate", "evaluate")
TINY = {
    "tracking.enabled": "false", "data.image_size": 64, "data.shard_size": 250,
    "tokenizer.vocab_size": 128, "tokenizer.min_frequency": 1, "loader.workers": 1,
    "dvae.steps": 3, "dvae.batch_size": 8, "dvae.n_hid": 8, "dvae.dec_n_hid": 8,
    "dvae.vocab_size": 32, "dvae.log_every": 1, "encode.batch_size": 64,
    "prior.steps": 2, "prior.batch_size": 4, "prior.n_layers": 1, "prior.d_model": 32,
    "prior.n_heads": 2, "prior.log_every": 1, "prior.sample_every": 1000, "prior.warmup_steps": 1,
    "clip.steps": 3, "clip.batch_size": 8, "clip.embed_dim": 16, "clip.text_width": 16,
    "clip.image_width": 8, "clip.text_layers": 1, "clip.text_heads": 2, "clip.log_every": 1,
    "clip.retrieval_candidates": 4, "generate.n_captions": 2, "generate.candidates": 2,
    "generate.keep": 1, "generate.batch_size": 2, "evaluate.blur_radii": [0],
    "evaluate.rerank_sizes": [1],
    # fp32 pinned: precision auto's first measurement allocates its own operands (~1.5 GB peak
    # with a cold cache), the same for any collection, which would hide the data path's memory
    "dvae.precision": "fp32", "clip.precision": "fp32", "prior.precision": "fp32",
    "generate.precision": "fp32",
}


def _args(root: Path, n: int, in_memory_mb: int) -> list[str]:
    sets = {**TINY, "data.synthetic.n_images": n, "loader.in_memory_max_mb": in_memory_mb,
            **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "tokens", "metrics",
                                                "models", "samples", "plots")}}
    return ["--params", str(REPO / "params.yaml"), *(a for k, v in sets.items()
                                                     for a in ("-S", f"{k}={v}"))]


def _peaks(root: Path, n: int, in_memory_mb: int, stages: tuple[str, ...],
           own: bool = False) -> dict[str, float]:
    """Each stage's peak RSS (MiB), each in a fresh process: the larger of the process's own and
    its DataLoader workers', or only its own (`own`: the in-memory path holds its array there)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = {}
    for stage in stages:
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage_rss.py"), stage,
                               *_args(root, n, in_memory_mb)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RSS "))
        rss = json.loads(line[4:])
        out[stage] = rss["self_mb"] if own else max(rss["self_mb"], rss["children_mb"])
    return out


def _world(root: Path, n: int) -> None:
    for stage in ("collect", "dedup", "prepare", "tokenizer"):
        stage_main(stage)(_args(root, n, 0))


def test_peak_rss_does_not_grow_with_the_collection(tmp_path: Path) -> None:
    _world(tmp_path / "small", 500)
    _world(tmp_path / "large", 5000)
    small = _peaks(tmp_path / "small", 500, 0, STAGES)
    large = _peaks(tmp_path / "large", 5000, 0, STAGES)
    growth = {s: round(large[s] - small[s], 1) for s in MEASURED}
    assert all(g < 25 for g in growth.values()), (growth, small, large)
    # the control: the same stage through the in-memory path holds the decoded split and grows
    memory_small = _peaks(tmp_path / "small", 500, 4096, ("train_dvae",), own=True)["train_dvae"]
    memory_large = _peaks(tmp_path / "large", 5000, 4096, ("train_dvae",), own=True)["train_dvae"]
    assert memory_large - memory_small > 30, (memory_small, memory_large)
