"""DVC stage `evaluate` (paper §3.1-3.2, fig. 9: FID/IS vs blur radius and rerank size) -> metrics/eval.json, plots/*.json + PNGs."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.eval.evaluate import evaluate

        return evaluate(params.evaluate, params.rerank, params.tokenizer, params.paths, tracker)

    return stage_main("evaluate", body, argv)


if __name__ == "__main__":
    main()
