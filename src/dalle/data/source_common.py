"""Pieces shared by the real-data sources (url_list, folder, webdataset)."""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from dalle.catalog import Artefacts
from dalle.data import shards
from dalle.errors import DataError
from dalle.io import write_json

log = logging.getLogger(__name__)


def shard_key(shard: int, position: int, shard_size: int) -> str:
    """img2dataset's key: zero-padded shard index, then the position in the shard."""
    width = max(4, len(str(shard_size - 1)))
    return f"{shard:05d}{position:0{width}d}"


def guard_row(make: Callable[[], shards.Sample], key: str, caption: str, url: Optional[str],
              source: str, ext: str) -> shards.Sample:
    """`make()`, or, if it raises anything, that row as a failed sample whose error names the
    exception: one bad row never stops a collection (docs/reliability.md)."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - any per-row failure is that row's error
        log.debug("%s: row %s failed", source, key, exc_info=True)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        return shards.Sample(key=key, caption=str(caption), image_bytes=None, ext=ext, meta={},
                             status="failed", error=f"unexpected: {detail}"[:500], url=url,
                             source=source)


class DaemonPool:
    """A minimal thread pool (`submit` -> Future) whose threads are daemons: when the collect is
    interrupted (SIGTERM, Ctrl-C) the process exits at once instead of joining threads still
    blocked in a download (each is bounded by its deadline, but a row may retry)."""

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                future.set_exception(exc)

    def shutdown(self, cancel: bool = False) -> None:
        """Stop the threads once the queue is done (`cancel`: drop what has not started)."""
        while cancel:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)

    def __enter__(self) -> "DaemonPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(cancel=exc[0] is not None)


def summarise(art: Artefacts, n_rows: Optional[int], n_new: int, tracker: Any, source: str
              ) -> dict[str, Any]:
    """finalize() the shards; an empty data set removes the manifest and raises."""
    manifest = shards.finalize(art.raw, art.raw_manifest)
    n_rows = len(manifest) if n_rows is None else n_rows
    ok = int((manifest["status"] == "ok").sum())
    if ok == 0:
        art.raw_manifest.unlink(missing_ok=True)  # an empty data set is not complete
        first = manifest["error"].dropna()
        raise DataError(f"{source}: none of {n_rows} samples is a usable image (first error: "
                        f"{first.iloc[0] if len(first) else 'none'})")
    kinds = Counter(str(e).split(":")[0] for e in manifest.loc[manifest["status"] != "ok", "error"])
    metrics: dict[str, Any] = {"rows": n_rows, "ok": ok, "failed": len(manifest) - ok,
                               "success_rate": ok / max(1, len(manifest)), "shards_written": n_new}
    metrics.update({f"failed_{kind}": n for kind, n in sorted(kinds.items())})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    log.info("%s: %d of %d samples ok; failures %s", source, ok, len(manifest), dict(kinds))
    return metrics


FINGERPRINT = "_source.json"
_OPERATIONAL = {"workers", "timeout_s", "retries", "backoff_s", "per_host"}  # may change on resume


def fingerprint(data_cfg: Any, section: Any, inputs: list[Path], seed: int) -> dict[str, Any]:
    """What the raw shards were made from: params + input files (size, mtime)."""
    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in inputs]
    return {"source": data_cfg.source, "image_size": data_cfg.image_size,
            "shard_size": data_cfg.shard_size, "seed": seed,
            "val_fraction": data_cfg.val_fraction,
            "section": section.model_dump(mode="json", exclude=_OPERATIONAL),
            "inputs": files}


def check_resume(out: Path, current: dict[str, Any]) -> None:
    """Resume only shards made from the same inputs and params; record them for next time."""
    path = out / FINGERPRINT
    if shards.completed_shards(out):
        previous = json.loads(path.read_text()) if path.is_file() else {"source": "unknown"}
        for key in current:
            if previous.get(key) != current[key]:
                raise DataError(f"{out} holds shards collected with other inputs ({key}: "
                                f"{str(previous.get(key))[:80]} -> {str(current[key])[:80]}); "
                                f"delete {out} to collect afresh")
        return
    write_json(path, current)


def val_caption_frame(manifest: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Evaluation captions for real data: up to n val captions in a seeded order (combo "val",
    no spec)."""
    val = manifest[(manifest["status"] == "ok") & (manifest["split"] == "val")]
    order = sorted(val["key"], key=lambda k: shards.key_fraction(k, seed + 1))[:n]
    picked = val.set_index("key").loc[order]
    return pd.DataFrame({"caption_id": [f"val-{k}" for k in order],
                         "caption": list(picked["caption"]), "combo": "val",
                         "spec": [None] * len(order)}).astype("string")
