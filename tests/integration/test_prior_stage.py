"""`train_prior` on tiny random tokens: outputs, exact resume after a kill, one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.io import load_checkpoint, read_json
from dalle.tracking import NullTracker
from dalle.train import prior as prior_mod
from tests.helpers import stage_main

prior_main = stage_main("train_prior")

REPO = Path(__file__).resolve().parents[2]
TINY = ["tracking.enabled=false", "tokenizer.text_len=6", "tokenizer.vocab_size=40", "dvae.vocab_size=24",
        "prior.n_layers=2", "prior.d_model=16", "prior.n_heads=2", "prior.conv_kernel=3", "prior.steps=6",
        "prior.batch_size=8", "prior.warmup_steps=2", "prior.log_every=2", "prior.sample_every=5",
        "prior.checkpoint_every=3"]


def write_tokens(root: Path, n: int = 24) -> None:
    """Two token files per split, as encode writes them (one per clean shard)."""
    rng = np.random.default_rng(0)
    (root / "tokens").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        lens = rng.integers(1, 7, n).astype(np.int32)
        txt = rng.integers(0, 40, (n, 6)).astype(np.int32)
        txt[np.arange(6)[None] >= lens[:, None]] = -1
        img = rng.integers(0, 24, (n, 16)).astype(np.uint16)
        keys = np.array([f"{split}{i}" for i in range(n)])
        for shard, rows in enumerate((slice(0, n // 2), slice(n // 2, n))):
            np.savez(root / "tokens" / f"{split}-{shard:05d}.npz", image_tokens=img[rows],
                     text_tokens=txt[rows], text_lengths=lens[rows], keys=keys[rows],
                     captions=np.array(["a b"] * n)[rows])


def params(root: Path, extra: tuple[str, ...] = ()) -> Any:
    paths = [f"paths.{k}={root / k}" for k in ("tokens", "models", "metrics", "plots")]
    return load_params(REPO / "params.yaml", None, [*TINY, *paths, *extra])


def run(p: Any) -> dict[str, float]:
    return prior_mod.train_prior(Artefacts(p.paths), NullTracker(), p.prior, p.tokenizer,
                                 p.dvae.vocab_size, p.distributed, p.seed)


def test_outputs_and_exact_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_tokens(a), write_tokens(b)
    metrics = run(params(a))
    assert metrics["steps"] == 6 and np.isfinite(metrics["val_loss_image"])
    for f in ("models/prior.safetensors", "models/prior.json", "metrics/prior.json", "plots/prior_loss.json"):
        assert (a / f).is_file(), f
    assert [r["step"] for r in read_json(a / "plots/prior_loss.json")] == [2, 4, 6]
    assert list((a / "models/.prior_samples").glob("*.png"))

    real = prior_mod.PriorTrainer.step

    def dying(self: Any, i: int) -> Any:
        if i == 4:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint
        return real(self, i)

    monkeypatch.setattr(prior_mod.PriorTrainer, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        run(params(b))
    assert (b / "models/prior.ckpt.safetensors").is_file()
    monkeypatch.setattr(prior_mod.PriorTrainer, "step", real)
    run(params(b))
    wa, _, _ = load_checkpoint(a / "models/prior.safetensors")
    wb, _, _ = load_checkpoint(b / "models/prior.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # resumed == uninterrupted, bit for bit
    assert read_json(a / "plots/prior_loss.json") == read_json(b / "plots/prior_loss.json")


def _stage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        prior_main(argv)
    assert exc.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [a for s in [*TINY, *(f"paths.{k}={tmp_path / k}" for k in ("tokens", "models", "metrics", "plots"))]
            for a in ("-S", s)]
    assert "no token file for the train split" in _stage_error(capsys, sets)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens/train-00000.npz").write_bytes(b"not an npz")
    (tmp_path / "tokens/val-00000.npz").write_bytes(b"not an npz")
    assert "not a valid tokens npz" in _stage_error(capsys, sets)
    write_tokens(tmp_path)
    assert "text_tokens" in _stage_error(capsys, [*sets, "-S", "tokenizer.text_len=7"])
    assert "beyond the vocabularies" in _stage_error(capsys, [*sets, "-S", "dvae.vocab_size=8"])
