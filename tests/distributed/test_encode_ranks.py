"""`encode` split by shard over two Horovod ranks (`distributed.num_proc: 2`, the stage relaunches
itself under horovodrun) writes byte-identical token files to one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle.io import save_checkpoint
from dalle.models.dvae import DiscreteVAE, dvae_config_dict
from tests.helpers import dvae_config, stage_main

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
TINY = {"tracking.enabled": "false", "data.synthetic.n_images": 240, "data.shard_size": 40,
        "data.image_size": 16, "tokenizer.vocab_size": 64, "tokenizer.min_frequency": 1}


def _sets(root: Path, tokens: str, **extra: object) -> list[str]:
    sets = {**TINY, **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "metrics", "models")},
            "paths.tokens": root / tokens, **extra}
    return [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]


def _encode(root: Path, tokens: str, num_proc: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("HOROVOD_RANK", None)
    cmd = [sys.executable, "-m", "stages.encode", "--params", str(REPO / "params.yaml"),
           *_sets(root, tokens, **{"distributed.num_proc": num_proc})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_ranks_write_the_files_one_process_writes(tmp_path: Path) -> None:
    for stage in ("collect", "dedup", "prepare", "tokenizer"):
        stage_main(stage)(["--params", str(REPO / "params.yaml"), *_sets(tmp_path, "tokens")])
    torch.manual_seed(0)
    dvae = DiscreteVAE(dvae_config(vocab_size=32, n_hid=8, group_count=1, n_init=8, dec_n_hid=8,
                                   image_size=16))
    save_checkpoint(tmp_path / "models" / "dvae.safetensors", dvae.state_dict(), dvae_config_dict(dvae))
    assert "[1]<" not in _encode(tmp_path, "one", 1)
    assert "[1]<" in _encode(tmp_path, "two", 2)  # horovodrun's prefix of rank 1's output
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(one) == 12 and one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:  # 6 train + 6 val shards, each written by one rank
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
