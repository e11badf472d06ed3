"""DVC stage `dedup` (paper §3.2): raw shards -> data/clean/{manifest,overlap}.parquet, metrics."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.data.dedup import run_dedup

        return run_dedup(params.dedup, params.paths, tracker)

    return stage_main("dedup", body, argv)


if __name__ == "__main__":
    main()
