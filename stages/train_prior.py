"""DVC stage `train_prior` (paper §2.2, §2.4): data/tokens -> models/prior.safetensors + metrics."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    from dalle.distributed.launch import relaunch_stage

    relaunch_stage("train_prior", argv)  # distributed.num_proc > 1: re-run under horovodrun, exit

    def body(params: Any, tracker: Any) -> Any:
        from dalle.distributed.strategy import strategy_for
        from dalle.train.prior import train_prior

        return train_prior(params.prior, params.tokenizer, params.paths, tracker,
                           distributed=strategy_for(params.distributed),
                           image_vocab=params.dvae.vocab_size, seed=params.data.seed)

    return stage_main("train_prior", body, argv)


if __name__ == "__main__":
    main()
