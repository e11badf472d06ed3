"""The `url_list` source: CC3M/CC12M/YFCC-style lists of (url, caption).

`collect_urls(data_cfg, art, tracker, seed)` reads the list (TSV/CSV/parquet), downloads every URL
with a thread pool (`dalle.data.fetch`: timeouts, retries with backoff, per-host politeness,
re-checked redirects, byte cap), normalises each image (`dalle.data.images`: validate, RGB,
resize + centre crop to `data.image_size`, re-encode) and writes img2dataset-layout shards through
`dalle.data.shards`. Every URL gets a manifest row; failures carry `error` = "<kind>: <detail>".

Resumable: shard i holds rows [i * shard_size, (i + 1) * shard_size) of the list, and completed
shards (their parquet exists) are skipped, so a killed run downloads nothing twice and loses
nothing. Shards are downloaded `_WINDOW` at a time so the pool never idles on one slow URL.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Data, UrlList
from dalle.data import shards
from dalle.data.source_common import (DaemonPool, check_resume, fingerprint, guard_row, shard_key,
                                      summarise)
from dalle.data.fetch import FetchError, FetchPolicy, HostLimiter, fetch
from dalle.data.images import ImageRejected, process_image
from dalle.errors import DataError

log = logging.getLogger(__name__)
SOURCE = "url_list"
_WINDOW = 2  # shards in flight


# ----------------------------------------------------------------------------- reading the list
def _read_table(path: Path, cfg: UrlList) -> pd.DataFrame:
    names = list(cfg.header_names) or None
    suffixes = "".join(path.suffixes).lower()
    try:
        if ".parquet" in suffixes:
            return pd.read_parquet(path)
        sep = "," if ".csv" in suffixes else "\t"
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, header=None if names
                           else "infer", names=names, quoting=3 if sep == "\t" else 0,
                           on_bad_lines="error", encoding_errors="replace")
    except pd.errors.EmptyDataError:
        raise DataError(f"url list {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"url list {path} cannot be parsed ({reason})") from None


def read_url_list(cfg: UrlList) -> pd.DataFrame:
    """The list as a DataFrame with str columns `url`, `caption`; one clear DataError otherwise."""
    if not cfg.path:
        raise DataError("data.source is url_list but data.url_list.path is not set")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"url list {path} does not exist (data.url_list.path)")
    if path.stat().st_size == 0:
        raise DataError(f"url list {path} is empty")
    table = _read_table(path, cfg)
    missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in table.columns]
    if missing:
        hint = ""
        if len(table.columns) == 1:
            other = "comma" if "," in str(table.columns[0]) else "tab"
            hint = f"; it has a single column, is it {other}-separated? (.tsv = tab, .csv = comma)"
        raise DataError(f"url list {path} has no column {missing[0]!r} (columns: "
                        f"{[str(c) for c in table.columns][:8]}){hint}")
    table = table[[cfg.url_col, cfg.caption_col]].rename(
        columns={cfg.url_col: "url", cfg.caption_col: "caption"})
    if table.empty:
        raise DataError(f"url list {path} has a header but no rows")
    return table.fillna("").astype(str).reset_index(drop=True)


# ----------------------------------------------------------------------------- one URL
def download_sample(key: str, url: str, caption: str, data_cfg: Data, policy: FetchPolicy,
                    limiter: HostLimiter) -> shards.Sample:
    """Fetch + normalise one row; never raises for a bad row (status "failed" + error)."""
    return guard_row(lambda: _download(key, url, caption, data_cfg, policy, limiter), key,
                     caption, url, SOURCE, data_cfg.url_list.image_format)


def _download(key: str, url: str, caption: str, data_cfg: Data, policy: FetchPolicy,
              limiter: HostLimiter) -> shards.Sample:
    cfg = data_cfg.url_list
    meta: dict[str, Any] = {"url": url}
    try:
        body, attempts = fetch(url, policy, limiter)
        meta["attempts"] = attempts
        img = process_image(body, data_cfg.image_size, min_side=cfg.min_side,
                            max_pixels=cfg.max_pixels, fmt=cfg.image_format,
                            quality=cfg.jpeg_quality)
    except (FetchError, ImageRejected) as exc:
        return shards.Sample(key=key, caption=caption, image_bytes=None, ext=cfg.image_format,
                             meta=meta, status="failed", error=str(exc)[:500], url=url,
                             source=SOURCE)
    meta.update(original_width=img.original_width, original_height=img.original_height,
                original_format=img.original_format, bytes=len(body))
    return shards.Sample(key=key, caption=caption, image_bytes=img.data, ext=img.ext, meta=meta,
                         status="ok", error=None, url=url, source=SOURCE)


# ----------------------------------------------------------------------------- the source
def collect_urls(data_cfg: Data, art: Artefacts, tracker: Any, seed: int,
                 on_shard_done: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Download the URL list into the raw shards + manifest; returns metrics."""
    cfg = data_cfg.url_list
    table = read_url_list(cfg)
    out = art.raw
    check_resume(out, fingerprint(data_cfg, cfg, [Path(str(cfg.path))], seed))
    size = data_cfg.shard_size
    n_shards = -(-len(table) // size)
    done = shards.completed_shards(out)
    todo = [i for i in range(n_shards) if i not in done]
    policy = FetchPolicy(cfg.timeout_s, cfg.max_bytes, cfg.retries, cfg.backoff_s,
                         allow_private=cfg.allow_private)
    limiter = HostLimiter(cfg.per_host)
    split_fn = shards.split_fn(data_cfg, seed)
    bar = tqdm(total=len(table), initial=sum(len(table.iloc[i * size:(i + 1) * size]) for i in done
                                             if i < n_shards), desc="collect: urls", unit="url")
    start, fetched = time.perf_counter(), 0
    with DaemonPool(cfg.workers, "fetch") as pool:  # an interrupt does not wait for downloads
        window: deque[tuple[int, list[Future]]] = deque()
        for shard in todo:
            window.append((shard, _submit_shard(pool, table, shard, data_cfg, policy, limiter)))
            if len(window) >= _WINDOW:
                fetched += _finish_shard(out, *window.popleft(), split_fn, bar, on_shard_done)
        while window:
            fetched += _finish_shard(out, *window.popleft(), split_fn, bar, on_shard_done)
    bar.close()
    seconds = time.perf_counter() - start
    metrics = summarise(art, len(table), len(todo), tracker, SOURCE)
    metrics["urls_per_s"] = round(fetched / seconds, 2) if fetched and seconds > 0 else 0.0
    return metrics


def _submit_shard(pool: DaemonPool, table: pd.DataFrame, shard: int, data_cfg: Data,
                  policy: FetchPolicy, limiter: HostLimiter) -> list[Future]:
    size = data_cfg.shard_size
    rows = table.iloc[shard * size:(shard + 1) * size]
    return [pool.submit(download_sample, shard_key(shard, pos, size), url, caption, data_cfg,
                        policy, limiter)
            for pos, (url, caption) in enumerate(zip(rows["url"], rows["caption"]))]


def _finish_shard(out: Path, shard: int, futures: list[Future], split_fn: Any, bar: tqdm,
                  on_shard_done: Optional[Callable[[int], None]]) -> int:
    samples = []
    for fut in futures:
        samples.append(fut.result())
        bar.update(1)
    shards.write_shard(out, shard, samples, split_fn)
    if on_shard_done is not None:
        on_shard_done(shard)
    return len(samples)
