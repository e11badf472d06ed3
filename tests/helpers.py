"""Test helpers: configs from params.yaml (where every default lives), tiny model configs, and the
artefact catalog of a temp directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.config_sections import Params, Paths
from dalle.models.clip import ClipConfig
from dalle.models.dvae import DVAEConfig
from dalle.models.transformer import PriorConfig

REPO = Path(__file__).resolve().parents[1]


def params(*overrides: str, **dotted: Any) -> Params:
    """params.yaml with `-S`-style overrides ("prior.n_layers=2") or dotted keywords
    (`**{"prior.n_layers": 2}`)."""
    extra = [f"{k}={v}" for k, v in dotted.items()]
    return load_params(REPO / "params.yaml", overrides=[*overrides, *extra])


def section(name: str, **values: Any) -> Any:
    """One section of params.yaml with some values replaced (validated)."""
    current = getattr(params(), name)
    return type(current).model_validate({**current.model_dump(), **values})


def paths_at(root: Path) -> Paths:
    """Every `paths` entry under `root` (same layout as params.yaml)."""
    base = params().paths
    return Paths(**{k: str(Path(root) / v) for k, v in base.model_dump().items()})


def art_at(root: Path) -> Artefacts:
    return Artefacts(paths_at(root))


def stage_main(name: str) -> Callable[..., Any]:
    """`python -m stages.<name>` in-process: the declared stage's `main(argv)`."""
    from dalle.pipeline import BY_NAME

    return BY_NAME[name].main


def prior_config(**kw: Any) -> PriorConfig:
    """A tiny prior: 40 text ids, text_len 6, 24 image codes on a 4x4 grid, 2 layers of 32."""
    base = dict(text_vocab=40, text_len=6, image_vocab=24, grid=4, n_layers=2, d_model=32, n_heads=4,
                mlp_ratio=4, attention="sparse", conv_kernel=3, dropout=0.0, checkpointing=False,
                attention_impl="auto")
    return PriorConfig(**{**base, **kw})


def dvae_config(**kw: Any) -> DVAEConfig:
    base = dict(vocab_size=64, n_hid=16, n_blk_per_group=1, group_count=4, n_init=16, dec_n_hid=16,
                image_size=32)
    return DVAEConfig(**{**base, **kw})


def clip_config(**kw: Any) -> ClipConfig:
    base = dict(embed_dim=16, image_width=8, text_width=16, text_layers=1, text_heads=2,
                temperature_init=0.07, image_size=16, vocab_size=40, text_len=8)
    return ClipConfig(**{**base, **kw})


def data_section(source: str, **values: Any) -> Any:
    """The `data` section of params.yaml for `source`; `values` replace keys of `data` or, when
    they are mappings, are merged into its sub-sections (`synthetic={...}`, `url_list={...}`)."""
    base = params().data.model_dump()
    for key, value in values.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return type(params().data).model_validate({**base, "source": source})


def raw_art(raw: Path) -> Artefacts:
    """The catalog of a collection whose raw shards live in `raw` (the rest beside it)."""
    root = Path(raw).parent
    base = paths_at(root).model_dump()
    return Artefacts(Paths(**{**base, "raw": str(raw)}))
