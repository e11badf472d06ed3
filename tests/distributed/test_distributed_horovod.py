"""Sharded + PowerSGD training on Gloo, launched with horovodrun (-np 2 / -np 4) in subprocesses.

Each test launches tests/distributed/worker.py; ranks use one thread each. The single-process
reference runs in this process with plain nn.Modules and torch.optim.Adam (no Horovod).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dalle.distributed.toy import ToyConfig, ToyModel, toy_batch
from dalle.io import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from prior_job import run_prior  # noqa: E402

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("worker.py")
HOROVODRUN = Path(sys.executable).with_name("horovodrun")


def launch(tmp: Path, np_: int, shard_group: int, jobs: list[dict[str, Any]],
           timeout: int = 150) -> tuple[subprocess.CompletedProcess, Any]:
    out = tmp / f"out{np_}x{shard_group}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HOROVOD_GLOO_TIMEOUT_SECONDS="30")
    cmd = [str(HOROVODRUN), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable,
           str(WORKER), str(out), str(shard_group), json.dumps(jobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, result


def reference_losses(cfg: ToyConfig, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = ToyModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(steps):
        tokens = toy_batch(cfg, step)  # [B, T]: the global batch
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def tail_mean(losses: list[float], n: int = 20) -> float:
    return sum(losses[-n:]) / n


@pytest.mark.parametrize("np_,shard_group", [(2, 2), (4, 2)])
def test_sharded_training_follows_single_process(tmp_path: Path, np_: int, shard_group: int) -> None:
    """Fig. 5 sharding (+ data parallelism across 'machines' at -np 4), compression off."""
    steps = 30
    jobs = [{"steps": steps}, {"kind": "prior", "steps": 8}]
    jobs += [{"steps": steps, "powersgd": 16}] if np_ > shard_group else []
    proc, result = launch(tmp_path, np_, shard_group, jobs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = reference_losses(ToyConfig(), steps)
    got = result[0]["loss"]
    assert len(got) == steps
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
    assert ref[-1] < ref[0] - 0.1  # it does train
    prior = run_prior(None, 8)  # the real prior: fused qkv, masks, per-resblock grad scales, AdamW
    assert result[1]["scales"] == prior["scales"] and prior["scales"][0] > 1024.0  # scales grew alike
    assert max(abs(a - b) for a, b in zip(result[1]["loss"], prior["loss"])) < 1e-4
    if len(result) > 2:  # sharding + PowerSGD together (each shard compressed with rank 16/2)
        psgd = result[2]
        assert psgd["wire_bytes"][0] < 0.6 * result[0]["wire_bytes"][0]
        assert tail_mean(psgd["loss"], 5) < tail_mean(got, 5) + 0.25


def test_powersgd_trains_close_to_uncompressed_and_error_feedback_matters(tmp_path: Path) -> None:
    """Two 'machines' of one rank: rank 16 on d_model 64 (r/d = 1/4, as 896/3968 in Table 1)."""
    jobs = [{"steps": 200}, {"steps": 200, "powersgd": 16}, {"steps": 200, "powersgd": 16, "ef": False},
            {"steps": 200, "powersgd": 16, "dtype": "16bit"}]
    proc, result = launch(tmp_path, 2, 1, jobs, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain, ef, no_ef, half = (tail_mean(r["loss"]) for r in result)
    # App. E.2's 16-bit buffers and all-reduce (bf16 buffers, fp16 on the Gloo wire, shared scale)
    assert abs(half - ef) < 0.1, (ef, half)
    assert result[3]["wire_bytes"][0] < 0.6 * result[1]["wire_bytes"][0]
    assert result[1]["wire_bytes"][0] < 0.5 * result[0]["wire_bytes"][0]  # it does compress
    assert ef < plain + 0.25, (plain, ef)  # stated margin: within 0.25 nats after 200 steps
    assert no_ef > ef + 0.1, (ef, no_ef)  # without error feedback: measurably worse


def test_resume_after_full_restart_continues_exactly(tmp_path: Path) -> None:
    """Two 'machines' with PowerSGD: weights, Adam state and the error buffers all resume."""
    ckpt = tmp_path / "ckpt"
    common = {"powersgd": 8, "every": 4}
    proc, first = launch(tmp_path, 2, 1, [{"steps": 12, "powersgd": 8},
                                          {"steps": 12, "ckpt": str(ckpt), "stop": 6, **common}])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in ckpt.glob("rank0.*")) == ["rank0.step4.safetensors"]
    _, _, state = load_checkpoint(ckpt / "rank0.step4.safetensors", with_state=True)
    errors = state["strategy"]["powersgd"]
    assert errors and sum(float(e.abs().sum()) for e in errors.values()) > 0  # saved, non-zero
    proc, second = launch(tmp_path, 2, 1, [{"steps": 12, "ckpt": str(ckpt), **common}])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    straight, resumed = first[0], second[0]
    assert resumed["step"] == list(range(5, 13))
    assert max(abs(a - b) for a, b in zip(resumed["loss"], straight["loss"][4:])) < 1e-5


def test_a_dying_rank_ends_the_job_with_a_clear_error(tmp_path: Path) -> None:
    proc, result = launch(tmp_path, 2, 1, [{"steps": 50, "die_rank": 1, "die_step": 3}], timeout=90)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "simulated crash at step 3" in output
    assert "exited with non-zero status" in output and "Exit code: 3" in output
    assert result is None
