"""One rank of a distributed test job (run by horovodrun from tests/distributed/test_*.py).

Usage: worker.py OUT_JSON SHARD_GROUP JOBS_JSON
JOBS_JSON is a list of {"steps", "powersgd" (rank, 0 = off), "ef", "dtype" (fp32 | 16bit), "ckpt",
"every", "stop", "die_rank", "die_step", "d_model"}; the jobs run one after the other in this Horovod session and
rank 0 writes the list of their results (world-mean loss per step, ...) to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from dalle.config_sections import Distributed, PowerSGD
from dalle.distributed.launch import under_horovod
from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.toy import ToyConfig, train_toy


def run_job(job: dict[str, Any], groups: Any, size: int, shard_group: int) -> dict[str, Any]:
    ps = PowerSGD(enabled=job.get("powersgd", 0) > 0, rank=max(job.get("powersgd", 0), 1),
                  error_feedback=job.get("ef", True), min_compression_dim=8, eps=1e-6,
                  dtype=job.get("dtype", "fp32"))
    dist = Distributed(num_proc=size, shard_group_size=shard_group, hosts=None, powersgd=ps)
    strategy = ShardedStrategy(dist, groups)
    if job.get("kind") == "prior":  # the real prior model on the same strategy
        from prior_job import run_prior

        return run_prior(strategy, job["steps"])
    stop = job.get("stop")
    dying = strategy.rank == job.get("die_rank", -1)
    if dying:
        stop = job["die_step"]
    ckpt = Path(job["ckpt"]) if job.get("ckpt") else None
    cfg = ToyConfig(d_model=job.get("d_model", 64))
    out = train_toy(cfg, strategy, job["steps"], ckpt, job.get("every", 0), stop)
    if dying:
        print(f"rank {strategy.rank}: simulated crash at step {job['die_step']}", flush=True)
        os._exit(3)
    return out


def main() -> None:
    out_path, shard_group, jobs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    size = int(os.environ.get("HOROVOD_SIZE", "1"))
    groups = None
    if under_horovod():
        from dalle.distributed import horovod as hv

        groups = hv.init_groups(shard_group)
    results = [run_job(job, groups, size, shard_group) for job in jobs]
    if groups is None or groups.world.rank == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
