"""Typed model configs: a knob walks from params.yaml to the module in one typed form, every
architecture knob round-trips through the checkpoint and its one loader, and a tampered stored
config is one line naming the file and the key."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from dalle.errors import CheckpointError
from dalle.io import save_checkpoint
from dalle.models.clip import ClipConfig, ContrastiveModel, clip_config_dict, load_clip
from dalle.models.config import from_dict, from_section
from dalle.models.dvae import DiscreteVAE, DVAEConfig, dvae_config_dict, load_dvae
from dalle.models.transformer import DalleTransformer, PriorConfig, load_prior, prior_config_dict
from tests.helpers import clip_config, dvae_config, params, prior_config

# a second valid value for every field (the tiny configs of tests.helpers hold the first)
PRIOR_ALT = dict(text_vocab=41, text_len=5, image_vocab=25, grid=3, n_layers=3, d_model=48, n_heads=8,
                 mlp_ratio=2, attention="full", conv_kernel=5, dropout=0.1, checkpointing=True,
                 attention_impl="masked")
DVAE_ALT = dict(vocab_size=48, n_hid=8, n_blk_per_group=2, group_count=3, n_init=12, dec_n_hid=12,
                image_size=16)
CLIP_ALT = dict(embed_dim=24, image_width=16, text_width=32, text_layers=2, text_heads=4,
                temperature_init=0.05, image_size=32, vocab_size=50, text_len=6)
KINDS = [(PriorConfig, prior_config, PRIOR_ALT, DalleTransformer, prior_config_dict, load_prior),
         (DVAEConfig, dvae_config, DVAE_ALT, DiscreteVAE, dvae_config_dict, load_dvae),
         (ClipConfig, clip_config, CLIP_ALT, ContrastiveModel, clip_config_dict, load_clip)]


def test_alternatives_cover_every_field() -> None:
    for cls, _, alt, *_ in KINDS:
        assert set(alt) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k[0].__name__ if isinstance(k, tuple) else "")
def test_every_architecture_knob_round_trips_through_the_checkpoint(tmp_path, kind: Any) -> None:
    cls, tiny, alt, model_cls, to_dict, load = kind
    for name, value in alt.items():
        config = tiny(**{name: value})
        assert getattr(config, name) == value
        torch.manual_seed(0)
        model = model_cls(config)
        path = save_checkpoint(tmp_path / f"{name}.safetensors", model.state_dict(), to_dict(model))
        loaded = load(path)
        assert loaded.config == config, name  # the module carries the one typed form
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_prior_knob_walks_from_params_to_the_module_in_one_typed_form() -> None:
    p = params("prior.attention_impl=masked", "prior.dropout=0.2", "prior.checkpointing=true",
               "prior.conv_kernel=3")
    config = from_section(PriorConfig, p.prior, text_vocab=p.tokenizer.vocab_size,
                          text_len=p.tokenizer.text_len, image_vocab=p.dvae.vocab_size, grid=8)
    model = DalleTransformer(config)
    assert model.config is config and isinstance(model.config, PriorConfig)
    assert (model.attention_impl, model.dropout, model.checkpointing, model.conv_kernel) == (
        "masked", 0.2, True, 3)
    d = from_section(DVAEConfig, p.dvae, image_size=p.data.image_size)
    assert DiscreteVAE(d).config.grid == p.data.image_size // 2 ** (p.dvae.group_count - 1)


@pytest.mark.parametrize("stored,needle", [
    ("not a dict", "is a str, not a mapping"),
    ({**dataclasses.asdict(prior_config()), "n_layers": "2"}, "n_layers='2' is not int"),
    ({**dataclasses.asdict(prior_config()), "checkpointing": 1}, "checkpointing=1 is not bool"),
    ({k: v for k, v in dataclasses.asdict(prior_config()).items() if k != "grid"}, "lacks 'grid'"),
    ({**dataclasses.asdict(prior_config()), "extra": 1}, "unknown key 'extra'"),
    ({**dataclasses.asdict(prior_config()), "n_heads": 5}, "not divisible by n_heads"),
])
def test_a_bad_stored_config_is_one_line_naming_the_file(stored: Any, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle) as err:
        from_dict(PriorConfig, stored, "models/x.safetensors")
    assert err.value.one_line().startswith("models/x.safetensors: ")
