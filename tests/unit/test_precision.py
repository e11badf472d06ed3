"""`precision: auto` (dalle.precision): measured once per machine at the model's GEMM shapes,
bf16 only where faster AND the loss check agrees, cached outside the repository, CUDA by device
capability, and the stage helpers leave the training run's RNG untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dalle import precision as P
from dalle.models.transformer import DalleTransformer
from dalle.train import precision_choice
from dalle.train.prior_loop import prior_loss
from tests.helpers import REPO, prior_config

CPU = torch.device("cpu")
OPS = [P.Op("linear", (64, 32), (16, 32), flops=2 * 64 * 32 * 16)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "precision.json"
    monkeypatch.setenv("DALLE_PRECISION_CACHE", str(path))
    return path


def speeds(monkeypatch: pytest.MonkeyPatch, fp32: float, bf16: float) -> list[int]:
    calls: list[int] = []

    def fake(ops: object, rounds: int = 5) -> dict[str, float]:
        calls.append(1)
        return {"fp32_gflops": fp32, "bf16_gflops": bf16, "gflop_per_forward": 1.0}

    monkeypatch.setattr(P, "time_ops", fake)
    return calls


def test_explicit_precisions_pass_through(cache: Path) -> None:
    for name in ("fp32", "bf16", "fp16"):
        assert P.resolve(name, CPU, "s", OPS).precision == name
    assert not cache.exists()
    with pytest.raises(ValueError, match="not one of"):
        P.resolve("fp8", CPU, "s", OPS)


def test_auto_measures_once_per_machine_and_caches_the_choice(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = speeds(monkeypatch, fp32=170.0, bf16=800.0)
    first = P.resolve("auto", CPU, "train_x", OPS, lambda p: 6.2 if p == "fp32" else 6.21)
    assert first.precision == "bf16" and "loss check equal" in first.reason
    assert first.figures["loss_fp32"] == 6.2 and first.figures["bf16_gflops"] == 800.0
    stored = json.loads(cache.read_text())
    (key,) = stored
    assert key.startswith(P.machine_key()) and f"torch {torch.__version__}" in key and "train_x" in key
    again = P.resolve("auto", CPU, "train_x", OPS, lambda p: pytest.fail("no second check"))
    assert again.precision == "bf16" and again.reason.startswith("cached") and len(calls) == 1
    P.resolve("auto", CPU, "train_y", OPS)  # another stage (or shape) is measured on its own
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def test_auto_keeps_fp32_where_bf16_is_slower_or_the_loss_moves(cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    speeds(monkeypatch, fp32=147.0, bf16=82.0)  # the Intel Xeon of docs/benchmarks.md
    slow = P.resolve("auto", CPU, "a", OPS, lambda p: pytest.fail("slower: no loss check needed"))
    assert slow.precision == "fp32" and "not faster" in slow.reason
    speeds(monkeypatch, fp32=170.0, bf16=800.0)
    moved = P.resolve("auto", CPU, "b", OPS, lambda p: 6.2 if p == "fp32" else 6.5)
    assert moved.precision == "fp32" and "loss check differs" in moved.reason


def test_auto_on_cuda_follows_the_device(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert P.resolve("auto", torch.device("cuda"), "s", OPS).precision == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.resolve("auto", torch.device("cuda"), "s", OPS).precision == "bf16"
    assert not cache.exists()  # nothing measured


def test_the_cache_lives_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DALLE_PRECISION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert P.cache_path() == tmp_path / "dalle" / "precision.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert P.cache_path() == Path.home() / ".cache" / "dalle" / "precision.json"
    assert REPO not in P.cache_path().parents


def test_recorded_ops_are_the_priors_gemms_and_time_in_both_dtypes() -> None:
    model = DalleTransformer(prior_config(n_layers=2))
    ids, lengths, image = torch.randint(0, 40, (3, 6)), torch.full((3,), 4), torch.randint(0, 24, (3, 16))
    ops = P.record_ops(lambda: model(ids, lengths, image))
    rows = model.seq_len - 1  # per caption: the stream minus its last token
    weights = {(op.shape, op.weight): op.count for op in ops}
    assert weights[((3, rows, 32), (96, 32))] == 2  # qkv of both layers, at the real [B, L, D]
    assert weights[((3, rows, 32), (128, 32))] == 2 and weights[((3, rows, 128), (32, 128))] == 2
    figures = P.time_ops(ops, rounds=1)
    assert figures["fp32_gflops"] > 0 and figures["bf16_gflops"] > 0


def test_the_prior_check_runs_the_real_loss_and_leaves_the_rng_alone(cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    speeds(monkeypatch, fp32=170.0, bf16=800.0)
    timed: list[str] = []
    real = P.time_forward
    monkeypatch.setattr(P, "time_forward", lambda fwd, rounds=4: (real(lambda p: (timed.append(p), fwd(p)), 1)
                                                                   and {"forward_fp32_s": 2.0, "forward_bf16_s": 1.0}))
    torch.manual_seed(0)
    model = DalleTransformer(prior_config(n_layers=2, dropout=0.1)).train()
    batch = (torch.randint(0, 40, (4, 6)), torch.full((4,), 5), torch.randint(0, 24, (4, 16)))
    before = torch.get_rng_state()
    choice = precision_choice.for_prior("auto", model, batch, (0.125, 0.875), CPU, prior_loss)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert choice.precision == "bf16" and {"fp32", "bf16"} <= set(timed)  # the real forward ran in both
    assert choice.figures["loss_bf16"] == pytest.approx(choice.figures["loss_fp32"], rel=0.01)


def test_the_whole_forward_pass_must_be_faster_too(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KV-cached sampling: tiny per-token GEMMs can be faster in bf16 while the decode is not."""
    import time

    speeds(monkeypatch, fp32=31.0, bf16=95.0)
    slow = P.resolve("auto", CPU, "gen", OPS, lambda p: 6.0, lambda p: time.sleep(0.02 if p == "bf16" else 0.01))
    assert slow.precision == "fp32" and "the forward pass is not" in slow.reason
    assert slow.figures["forward_bf16_s"] > slow.figures["forward_fp32_s"]
    fast = P.resolve("auto", CPU, "gen2", OPS, lambda p: 6.0, lambda p: time.sleep(0.01 if p == "bf16" else 0.02))
    assert fast.precision == "bf16" and "forward pass" in fast.reason


def test_convolutions_are_timed_in_the_layout_the_model_ran_in() -> None:
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    (op,) = P.record_ops(lambda: conv(x))
    assert op.kind == "conv" and op.channels_last and op.padding == (1, 1)
    (plain,) = P.record_ops(lambda: torch.nn.Conv2d(8, 8, 3)(torch.randn(2, 8, 16, 16)))
    assert not plain.channels_last
