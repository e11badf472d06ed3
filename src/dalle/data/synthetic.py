"""The synthetic captioned world: deterministic scenes -> raw shards + evaluation captions.

Image i is drawn from `np.random.default_rng([seed, i])` alone (params `seed`), so shard j (images
[j*shard_size, (j+1)*shard_size)) can be rendered by any process, in any order, and a rerun is
byte-identical. Split rule: an image containing a `data.synthetic.holdout` "colour shape" pair
always goes to val (those combos never appear in train); the rest split by key hash
(`shards.split_fn`). The evaluation captions hold fresh captions of seen combos (combo "seen")
and of holdout combos (combo "holdout") with their spec JSON, which `dalle.eval.oracle` scores.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Data, Synthetic
from dalle.data import shards
from dalle.data.synthetic_captions import COLOURS, SHAPES, caption, combo, sample_spec
from dalle.data.synthetic_render import place, render
from dalle.errors import ConfigError
from dalle.io import atomic_path

log = logging.getLogger(__name__)
SOURCE = "synthetic"
EVAL_SEED_OFFSET = 1_000_003  # eval captions come from a stream disjoint from the images'


def check_holdout(cfg: Synthetic) -> frozenset[str]:
    """The holdout "colour shape" pairs, validated against the world's vocabulary."""
    valid = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    for pair in cfg.holdout:
        if pair not in valid:
            raise ConfigError(f"data.synthetic.holdout entry {pair!r} is not a 'colour shape' pair "
                              f"(colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)})")
    if len(set(cfg.holdout)) >= len(valid):
        raise ConfigError("data.synthetic.holdout holds out every colour-shape pair")
    return frozenset(cfg.holdout)


def scene(cfg: Synthetic, size: int, index: int, seed: int) -> tuple[dict[str, Any], str, list, Any]:
    """Image `index` of the world: (spec, caption, placed objects, PIL image)."""
    rng = np.random.default_rng([seed, index])
    spec = sample_spec(rng, cfg.min_objects, cfg.max_objects)
    text = caption(spec, rng)
    placed = place(spec, size, rng, cfg.jitter)
    return spec, text, placed, render(placed, size, rng, cfg.background_tint)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def render_shard(args: tuple[Data, str, int, int]) -> int:
    """Render and write shard `index` (the unit of work of the process pool)."""
    data_cfg, out_dir, index, seed = args
    cfg, size = data_cfg.synthetic, data_cfg.image_size
    holdout, by_hash = check_holdout(cfg), shards.split_fn(data_cfg, seed)
    lo, hi = index * data_cfg.shard_size, min(cfg.n_images, (index + 1) * data_cfg.shard_size)
    samples, split_of = [], {}
    for i in range(lo, hi):
        spec, text, placed, image = scene(cfg, size, i, seed)
        key = f"{index:05d}{i - lo:04d}" if data_cfg.shard_size <= 10_000 else f"{i:09d}"
        held = any(combo(o) in holdout for o in spec["objects"])
        split_of[key] = "val" if held else by_hash(key)
        meta = {"spec": spec, "objects": placed, "index": i, "holdout": held}
        samples.append(shards.Sample(key=key, caption=text, image_bytes=_png(image), ext="png",
                                     meta=meta, url=f"synthetic://{seed}/{i}", source=SOURCE))
    shards.write_shard(out_dir, index, samples, split_of.__getitem__)
    return hi - lo


def _eval_specs(cfg: Synthetic, holdout: frozenset[str], want_holdout: bool, n: int,
                seed: int) -> Iterator[tuple[dict[str, Any], str]]:
    rng = np.random.default_rng([seed, EVAL_SEED_OFFSET, int(want_holdout)])
    made, tries = 0, 0
    while made < n and tries < 200 * n:
        tries += 1
        spec = sample_spec(rng, cfg.min_objects, cfg.max_objects)
        if any(combo(o) in holdout for o in spec["objects"]) == want_holdout:
            made += 1
            yield spec, caption(spec, rng)


def write_eval_captions(cfg: Synthetic, path: Path, n: int, seed: int) -> pd.DataFrame:
    """The evaluation captions: seen-combo and holdout-combo captions with their specs."""
    holdout, rows = check_holdout(cfg), []
    for kind in ("seen", "holdout"):
        if kind == "holdout" and not holdout:
            continue
        for j, (spec, text) in enumerate(_eval_specs(cfg, holdout, kind == "holdout", n, seed)):
            rows.append({"caption_id": f"{kind}-{j:04d}", "caption": text, "combo": kind,
                         "spec": json.dumps(spec, sort_keys=True)})
    frame = pd.DataFrame(rows, columns=["caption_id", "caption", "combo", "spec"]).astype("string")
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def collect_synthetic(data_cfg: Data, art: Artefacts, tracker: Any, seed: int,
                      workers: int = 0) -> dict[str, Any]:
    """Render the world into the raw shards (resuming), manifest + eval captions; metrics."""
    cfg, out = data_cfg.synthetic, art.raw
    check_holdout(cfg)
    n_shards = -(-cfg.n_images // data_cfg.shard_size)
    todo = sorted(set(range(n_shards)) - shards.completed_shards(out))
    workers = workers or min(len(os.sched_getaffinity(0)), 8, max(1, len(todo)))
    start, jobs = time.perf_counter(), [(data_cfg, str(out), i, seed) for i in todo]
    bar = tqdm(total=cfg.n_images, desc="collect: synthetic", unit="img",
               initial=cfg.n_images - sum(min(cfg.n_images, (i + 1) * data_cfg.shard_size)
                                          - i * data_cfg.shard_size for i in todo))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(render_shard, jobs):
                bar.update(n)
    else:
        for job in jobs:
            bar.update(render_shard(job))
    bar.close()
    seconds = time.perf_counter() - start
    manifest = shards.finalize(out, art.raw_manifest)
    evals = write_eval_captions(cfg, art.raw_eval_captions, data_cfg.eval_captions, seed)
    rendered = sum(min(cfg.n_images, (i + 1) * data_cfg.shard_size) - i * data_cfg.shard_size
                   for i in todo)
    counts = manifest["split"].value_counts()
    return {"rows": len(manifest), "ok": int((manifest["status"] == "ok").sum()),
            "failed": int((manifest["status"] != "ok").sum()), "shards_written": len(todo),
            "train": int(counts.get("train", 0)), "val": int(counts.get("val", 0)),
            "eval_captions_seen": int((evals["combo"] == "seen").sum()),
            "eval_captions_holdout": int((evals["combo"] == "holdout").sum()),
            "images_per_s": round(rendered / seconds, 1) if rendered and seconds > 0 else 0.0}
