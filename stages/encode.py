"""DVC stage `encode` (paper §2.2): dVAE + tokenizer + clean splits -> data/tokens/{train,val}.npz."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.tokens import encode_tokens

        return encode_tokens(params.encode, params.tokenizer.text_len, params.paths, tracker)

    return stage_main("encode", body, argv)


if __name__ == "__main__":
    main()
