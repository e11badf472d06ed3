"""One rank of a distributed test job (run by horovodrun from tests/distributed/test_*.py).

Usage: worker.py OUT_JSON STEPS SHARD_GROUP [--powersgd RANK] [--no-ef] [--ckpt DIR EVERY]
                 [--stop-after N] [--die-rank R --die-step S]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from dalle.config_sections import Distributed, PowerSGD
from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.toy import ToyConfig, train_toy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("shard_group", type=int)
    ap.add_argument("--powersgd", type=int, default=0)
    ap.add_argument("--no-ef", action="store_true")
    ap.add_argument("--ckpt", nargs=2, default=None)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--die-rank", type=int, default=-1)
    ap.add_argument("--die-step", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ps = PowerSGD(enabled=args.powersgd > 0, rank=max(args.powersgd, 1),
                  error_feedback=not args.no_ef, min_compression_dim=8)
    size = int(os.environ.get("HOROVOD_SIZE", "1"))
    dist = Distributed(num_proc=size, shard_group_size=args.shard_group, powersgd=ps)
    strategy = ShardedStrategy.from_config(dist)
    stop = args.stop_after
    if strategy.rank == args.die_rank:
        stop = args.die_step
    ckpt = (args.ckpt[0], int(args.ckpt[1])) if args.ckpt else (None, 0)
    from pathlib import Path

    cfg = ToyConfig(d_model=args.d_model)
    out = train_toy(cfg, strategy, args.steps, Path(ckpt[0]) if ckpt[0] else None, ckpt[1], stop)
    if strategy.rank == args.die_rank:
        print(f"rank {strategy.rank}: simulated crash at step {args.die_step}", flush=True)
        os._exit(3)
    if strategy.is_chief:
        with open(args.out, "w") as fh:
            json.dump(out, fh)


if __name__ == "__main__":
    main()
