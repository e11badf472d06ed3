"""DVC stage `train_dvae` (paper §2.1, App. A.2): clean images -> models/dvae.safetensors + .json,
models/dvae_recon.png, metrics/dvae.json."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from dalle.runner import stage_main


def main(argv: Optional[Sequence[str]] = None) -> Any:
    def body(params: Any, tracker: Any) -> Any:
        from dalle.train.dvae import train_dvae

        return train_dvae(params.dvae, params.paths, tracker, seed=params.seed)

    return stage_main("train_dvae", body, argv)


if __name__ == "__main__":
    main()
