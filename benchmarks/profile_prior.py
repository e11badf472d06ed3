"""Profile one contender's training step or sampling run with torch.profiler ("make it fast").

    benchmarks/.venv-peers/bin/python -m benchmarks.profile_prior --impl dalle --what train --shape paper-shaped

Prints the top operators by self CPU time (and the same grouped by input shape with --shapes) and
writes a Chrome trace to benchmarks/results/profiles/profile_<impl>_<what>_<shape>.json (chrome://tracing,
perfetto). Not run by `make bench`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import peers
from benchmarks.bench_peers_prior import make_step
from benchmarks.bench_peers_sampling import dalle_pytorch_step, gpt2_sampler, ours_sampler
from benchmarks.common import threads

BUILD = {"dalle": peers.build_ours, "dalle-pytorch": peers.build_dalle_pytorch, "gpt2-hf": peers.build_gpt2}


def workload(impl: str, what: str, shape: peers.Shape, bf16: bool):
    """A no-argument callable running one training step or one generation of `impl`."""
    model = BUILD[impl](shape)
    if what == "train":
        text, image = peers.random_batch(shape, shape.batch)
        return make_step(impl, model.train(), shape, text, image, autocast=bf16)
    text, image = peers.random_batch(shape, 8)
    model.eval()
    if impl == "dalle-pytorch":  # one uncached step at the full prefix: the costliest of its loop
        return lambda: dalle_pytorch_step(model, text, image[:, :-1])
    fn = (ours_sampler if impl == "dalle" else gpt2_sampler)(model, shape, text)
    return fn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_prior")
    ap.add_argument("--impl", choices=sorted(BUILD), default="dalle")
    ap.add_argument("--what", choices=("train", "sample"), default="train")
    ap.add_argument("--shape", default="default", help="default | paper-shaped | quick")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (training)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--shapes", action="store_true", help="also group by input shapes")
    args = ap.parse_args(argv)
    shapes = {s.name: s for s in peers.shapes()}
    if args.shape not in shapes:
        print(f"error: unknown --shape {args.shape!r} (have {', '.join(shapes)})", file=sys.stderr)
        return 1
    torch.set_num_threads(threads())
    fn = workload(args.impl, args.what, shapes[args.shape], args.bf16)
    with torch.no_grad() if args.what == "sample" else torch.enable_grad():
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.shapes:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    out = Path("benchmarks/results/profiles") / f"profile_{args.impl}_{args.what}_{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    print(f"trace: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
