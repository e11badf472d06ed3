"""DVC stage `collect` (paper §3.1/§3.2 data): data.source -> data/raw shards + manifest + metrics."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.data.collect import collect

        return collect(params.data, params.paths, tracker)

    return stage_main("collect", body, argv)


if __name__ == "__main__":
    main()
