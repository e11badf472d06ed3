"""DVC stage `tokenizer` (paper §2.2): train captions -> models/tokenizer.json (BPE) + metrics."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.data.tokenizer import train_tokenizer

        return train_tokenizer(params.tokenizer, params.paths, tracker)

    return stage_main("tokenizer", body, argv)


if __name__ == "__main__":
    main()
