"""Distributed prior training (paper §2.5): step time, bytes on the wire, memory per rank.

    python -m benchmarks.bench_distributed            # -np 1 in-process, -np 2 under horovodrun
    python -m benchmarks.bench_distributed --model    # only the scaling model (paper Table 1)

Cases on a prior-shaped toy stack (separate q/k/v/o, 4x MLP): np1; np2-shard (one machine of two
ranks: parameter sharding); np2-dp (two machines of one rank: plain all-reduce); np2-dp-powersgd
(the same with PowerSGD, r/d = 1/4 as 896/3968 in Table 1). Every rank runs one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import emit, quick, section
from dalle.distributed.powersgd import compression_rate
from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.toy import ToyConfig, train_toy

CASES = {"np2-shard": (2, 2, 0), "np2-dp": (2, 1, 0), "np2-dp-powersgd": (2, 1, 64)}
# Paper Table 1 sizes; 64 resblocks each (12 L d^2 ~ 2.8B / 5.6B / 12B).
PAPER = [("2.8B", 1920, 512), ("5.6B", 2688, 640), ("12.0B", 3968, 896)]


def toy() -> ToyConfig:
    if quick():
        return ToyConfig(vocab=64, d_model=64, n_heads=4, n_layers=2, seq_len=16, batch_size=8)
    return ToyConfig(vocab=512, d_model=256, n_heads=4, n_layers=4, seq_len=64, batch_size=8)


def measure(shard_group: int, psgd_rank: int) -> dict:
    torch.set_num_threads(1)
    size = int(os.environ.get("HOROVOD_SIZE", "1"))
    ps = dict(section("distributed").powersgd.model_dump(), enabled=psgd_rank > 0,
              rank=max(psgd_rank, 1), min_compression_dim=16)
    strategy = ShardedStrategy.from_config(section("distributed", num_proc=size, shard_group_size=shard_group,
                                                   powersgd=ps))
    out = train_toy(toy(), strategy, 6 if quick() else 25)
    return {"step_s": statistics.median(out["seconds"][3:]), "wire_bytes": out["wire_bytes"][-1],
            "state_bytes": out["state_bytes"][0], "rank": strategy.rank}


def run_case(np_: int, shard_group: int, psgd_rank: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "res.json"
        cmd = [str(Path(sys.executable).with_name("horovodrun")), "-np", str(np_), "-H",
               f"localhost:{np_}", "--gloo", sys.executable, "-m", "benchmarks.bench_distributed",
               "--worker", str(shard_group), str(psgd_rank), str(res)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=300)
        return json.loads(res.read_text())


def scaling_model(gpu_tflops: float, mfu: float, bytes_per_el: int, gpus: int = 1024) -> None:
    """Per step: compute vs the cross-machine all-reduce, with and without PowerSGD (App. E)."""
    machines = gpus // 8
    tokens = 1024 * (256 + 1024)  # App. B.2: batch 1024 of 256 text + 32x32 image tokens
    for size, d, r in PAPER:
        n_params = 12 * 64 * d * d
        compute_s = 6 * n_params * tokens / (gpus * gpu_tflops * 1e12 * mfu)
        ring = 2 * (machines - 1) / machines  # ring all-reduce: each byte crosses the NIC ~2x
        dense = n_params * bytes_per_el * ring  # bytes per machine per step
        rate = compression_rate(d, r)
        breakeven_gbit = dense * 8 / compute_s / 1e9
        emit("distributed", f"model-{size}", "dalle", "breakeven Gbit/s", breakeven_gbit,
             higher_is_better=False, note=f"uncompressed comm = compute ({compute_s:.2f} s/step); "
             f"PowerSGD {rate:.0%} lowers it to {breakeven_gbit * (1 - rate):.0f} Gbit/s")
        for gbit in (10, 25, 100, 400):
            comm = dense * 8 / (gbit * 1e9)
            print(f"{size}: {gbit:>3} Gbit/s/machine  compute {compute_s:.2f}s  all-reduce "
                  f"{comm:.2f}s dense vs {comm * (1 - rate):.2f}s PowerSGD")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3, default=None)
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--gpu-tflops", type=float, default=125.0)  # V100 fp16 tensor-core peak
    ap.add_argument("--mfu", type=float, default=0.3)
    args = ap.parse_args()
    if args.worker:
        shard_group, psgd_rank, res = int(args.worker[0]), int(args.worker[1]), args.worker[2]
        result = measure(shard_group, psgd_rank)
        if result["rank"] == 0:
            Path(res).write_text(json.dumps(result))
        return
    scaling_model(args.gpu_tflops, args.mfu, bytes_per_el=2)
    if args.model:
        return
    cfg = toy()
    note = f"toy d={cfg.d_model} L={cfg.n_layers} batch={cfg.batch_size}x{cfg.seq_len}, 1 thread/rank"
    results = {"np1": measure(1, 0)}
    results.update({case: run_case(*spec) for case, spec in CASES.items()})
    for case, r in results.items():
        emit("distributed", case, "dalle", "s/step", r["step_s"], higher_is_better=False, note=note)
        emit("distributed", case, "dalle", "wire bytes/step/rank", r["wire_bytes"],
             higher_is_better=False, note="cross-machine all-reduce payload")
        emit("distributed", case, "dalle", "param+Adam bytes/rank", r["state_bytes"],
             higher_is_better=False)


if __name__ == "__main__":
    main()
