"""DVC stage `generate` (paper §2.6: N candidates per eval caption, reranked, top k kept) -> samples/ (PNGs, index.parquet, candidates.npz, grids), metrics/generate.json."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.generate import generate

        return generate(params.generate, params.rerank, params.tokenizer, params.paths, tracker)

    return stage_main("generate", body, argv)


if __name__ == "__main__":
    main()
