"""The `prepare` stage: the clean splits, decoded once, written as shards at the training size.

After dedup, every kept sample of raw shard r that passes the web-data filters
(`dalle.data.filters`) goes to the clean shard `<split>-r` (webdataset members `key.<png|jpg|
webp>` + `key.txt`), in manifest order. An image already stored at `data.image_size` in the
chosen format is copied byte for byte (the synthetic world's PNGs: nothing is decoded); any
other is decoded once, centre-cropped / resized and encoded. The clean manifest (one row per
clean sample: key, caption, split, shard, index in the shard, width, height, source) is what
every later image stage reads (`dalle.data.reader`); none of them reads the raw shards again.
Raw shards are independent units of work (threads: PIL releases the GIL while it decodes and
encodes), each finished when its marker is written, so a killed run resumes where it was.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from dalle.catalog import SPLITS, Artefacts
from dalle.config_sections import Prepare
from dalle.data import filters, shards
from dalle.data.images import encode, resize_center_crop, to_rgb
from dalle.errors import DataError
from dalle.io import atomic_path, write_json
from dalle.stage import Out, StageSpec

log = logging.getLogger(__name__)
EXT = {"png": "png", "jpg": "jpg", "webp": "webp"}
COLUMNS = ["key", "caption", "split", "shard", "index", "width", "height", "source"]


def kept_rows(art: Artefacts) -> pd.DataFrame:
    """The dedup manifest's ok rows that are not duplicates, in manifest order."""
    if not art.dedup_manifest.is_file():
        raise DataError(f"{art.dedup_manifest} does not exist; run the dedup stage first")
    rows = pd.read_parquet(art.dedup_manifest)
    return rows[(rows["status"] == "ok") & rows["dup_of"].isna()].reset_index(drop=True)


def _image(data: bytes, ext: str, size: int, cfg: Prepare) -> tuple[bytes, bool]:
    """(stored bytes, re-encoded?): a copy when format and size already fit."""
    want = EXT[cfg.image_format]
    with Image.open(io.BytesIO(data)) as img:
        fits = img.size == (size, size) and ext.lower().replace("jpeg", "jpg") == want
        if fits:
            return data, False
        rgb = resize_center_crop(to_rgb(img), size)
        return encode(rgb, cfg.image_format, cfg.jpeg_quality), True


def _marker(art: Artefacts, shard: int) -> Path:
    """Written last for a raw shard (its rows and counts): the shard is done."""
    return art.clean / f".{shard:05d}.done.json"


def _write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    """A webdataset shard (webdataset's TarWriter; fixed mtime and owner: byte-identical reruns)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        with TarWriter(fh, user="", group="", mode=0o644, encoder=False, mtime=0.0) as tar:
            for sample in samples:
                tar.write(sample)


def prepare_shard(args: tuple[Artefacts, Prepare, int, int, pd.DataFrame]) -> dict[str, Any]:
    """One raw shard -> its clean shard per split; returns its manifest rows and counts."""
    art, cfg, size, shard, rows = args
    wanted = {k: (c, s) for k, c, s in zip(rows["key"], rows["caption"], rows["split"])}
    reason_of, counts = filters.build(cfg.filters, size), Counter()
    members: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    out: list[dict[str, Any]] = []
    for key, ext, data, _caption, meta in shards.iter_tar(shards.shard_file(art.raw, shard, ".tar")):
        if key not in wanted or data is None:
            continue
        caption, split = wanted.pop(key)
        found = filters.Row(caption, int(meta.get("original_width", 0) or size),
                            int(meta.get("original_height", 0) or size))
        why = reason_of(found)
        if why is not None:
            counts[f"removed_{why}"] += 1
            continue
        stored, recoded = _image(data, ext, size, cfg)
        counts["reencoded" if recoded else "copied"] += 1
        out.append({"key": key, "caption": caption, "split": split, "shard": shard,
                    "index": len(members[split]), "width": size, "height": size,
                    "source": str(meta.get("source") or "")})
        members[split].append({"__key__": key, EXT[cfg.image_format]: stored,
                               "txt": caption.encode("utf-8")})
    if wanted:
        raise DataError(f"{len(wanted)} kept rows of raw shard {shard} are not in its tar "
                        f"(first: {next(iter(wanted))!r}); rerun collect")
    for split, files in members.items():
        if files:
            _write_tar(art.clean_shard(split, shard), files)
    result = {"rows": out, "counts": dict(counts)}
    write_json(_marker(art, shard), result)
    return result


def _jobs(art: Artefacts, cfg: Prepare, size: int, rows: pd.DataFrame) -> tuple[list, dict[int, dict]]:
    """The raw shards still to do, and the results of those a killed run finished."""
    todo, done = [], {}
    for shard, group in rows.groupby("shard", sort=True):
        marker = _marker(art, int(shard))
        if marker.is_file():
            done[int(shard)] = json.loads(marker.read_text(encoding="utf-8"))
        else:
            todo.append((art, cfg, size, int(shard), group))
    return todo, done


def _run(todo: list, workers: int, total: int) -> dict[int, dict]:
    results: dict[int, dict] = {}
    bar = tqdm(total=total, desc="prepare", unit="img")
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
            for job, result in zip(todo, pool.map(prepare_shard, todo)):
                results[job[3]] = result
                bar.update(len(job[4]))
    else:
        for job in todo:
            results[job[3]] = prepare_shard(job)
            bar.update(len(job[4]))
    bar.close()
    return results


def prepare(art: Artefacts, tracker: Any, prepare: Prepare, image_size: int) -> dict[str, Any]:
    """The stage body: dedup's kept rows -> filtered clean shards + manifest + metrics."""
    cfg, start = prepare, time.perf_counter()
    rows = kept_rows(art)
    if rows.empty:
        raise DataError(f"{art.dedup_manifest} keeps no rows; nothing to prepare")
    art.clean.mkdir(parents=True, exist_ok=True)
    todo, results = _jobs(art, cfg, image_size, rows)
    workers = cfg.workers or min(len(os.sched_getaffinity(0)), 8)
    results.update(_run(todo, workers, len(rows)))
    manifest = pd.DataFrame([r for s in sorted(results) for r in results[s]["rows"]], columns=COLUMNS)
    counts = sum((Counter(results[s]["counts"]) for s in results), Counter())
    if manifest.empty:
        raise DataError(f"prepare kept none of {len(rows)} rows: {dict(counts)}")
    with atomic_path(art.clean_manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    if art.raw_eval_captions.is_file():
        with atomic_path(art.eval_captions) as tmp:
            shutil.copyfile(art.raw_eval_captions, tmp)
    metrics = _metrics(manifest, counts, len(rows), time.perf_counter() - start, art)
    write_json(art.metrics("prepare"), metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _metrics(manifest: pd.DataFrame, counts: Counter, n_in: int, seconds: float,
             art: Artefacts) -> dict[str, Any]:
    by_split = manifest["split"].value_counts()
    size = sum(p.stat().st_size for p in art.clean.glob("*.tar"))
    return {"rows_in": n_in, "kept": len(manifest),
            **{f"kept_{s}": int(by_split.get(s, 0)) for s in SPLITS},
            **{k: int(v) for k, v in sorted(counts.items())},
            "clean_mb": round(size / 2 ** 20, 1), "seconds": round(seconds, 2),
            "images_per_s": round(n_in / seconds, 1) if seconds > 0 else 0.0}


STAGE = StageSpec(
    name="prepare", fn=prepare, params=("prepare", "data.image_size"),
    inputs=lambda a: (a.raw, a.dedup),
    outputs=lambda a: (Out(a.clean), Out(a.metrics("prepare"), metric=True)),
    summary="the clean splits decoded once, filtered for web data, as shards at the training size",
)
