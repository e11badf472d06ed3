"""Pieces shared by the real-data sources (url_list, folder, webdataset)."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from dalle.data import shards
from dalle.errors import DataError

log = logging.getLogger(__name__)


def shard_key(shard: int, position: int, shard_size: int) -> str:
    """img2dataset's key: zero-padded shard index, then the position in the shard."""
    width = max(4, len(str(shard_size - 1)))
    return f"{shard:05d}{position:0{width}d}"


def summarise(out: Path, n_rows: Optional[int], n_new: int, tracker: Any, source: str
              ) -> dict[str, Any]:
    """finalize() the shards; an empty data set removes the manifest and raises."""
    manifest = shards.finalize(out)
    n_rows = len(manifest) if n_rows is None else n_rows
    ok = int((manifest["status"] == "ok").sum())
    if ok == 0:
        (out / "manifest.parquet").unlink(missing_ok=True)  # an empty data set is not complete
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
