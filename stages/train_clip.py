"""DVC stage `train_clip` (paper §2.6: the contrastive reranker) -> models/clip.safetensors + clip.json, metrics/clip.json."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.train.clip import train_clip

        return train_clip(params.clip, params.data, params.tokenizer, params.paths, tracker, params.seed)

    return stage_main("train_clip", body, argv)


if __name__ == "__main__":
    main()
