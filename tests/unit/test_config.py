"""dalle.config: params.yaml -> frozen typed tree; every bad input is one ConfigError line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dalle.config import ConfigError, flatten, load_params, params_hash, resolve_preset

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    mutate(raw)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def test_default_params_load_and_are_frozen() -> None:
    params = load_params(PARAMS)
    assert params.data.source == "synthetic"
    assert params.prior.loss_text_weight == pytest.approx(1 / 8)  # paper §2.2
    assert params.prior.loss_image_weight == pytest.approx(7 / 8)
    with pytest.raises(Exception):
        params.prior.n_layers = 3  # frozen
    assert isinstance(params.evaluate.blur_radii, tuple)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["prior"].update(n_layerz=3), "prior.n_layerz: unknown key"),
        (lambda r: r["prior"].pop("d_model"), "prior.d_model: missing required key"),
        (lambda r: r["prior"].update(n_layers="four"), "prior.n_layers: bad value 'four'"),
        (lambda r: r["prior"].update(n_layers=-2), "prior.n_layers: bad value -2"),
        (lambda r: r["dvae"].update(lr=True), "dvae.lr: bad value True"),
        (lambda r: r["data"].update(source="ftp"), "data.source: bad value 'ftp'"),
        (lambda r: r["data"].update(val_fraction=1.5), "data.val_fraction: bad value 1.5"),
        (lambda r: r["generate"].update(keep=64, candidates=4), "keep 64 > candidates 4"),
        (lambda r: r["prior"].update(d_model=250, n_heads=4), "not divisible by n_heads"),
        (lambda r: r.update(surprise={}), "surprise: unknown key"),
        (lambda r: r["distributed"].update(num_proc=3, shard_group_size=2), "not a multiple"),
    ],
)
def test_bad_values_name_key_value_and_expectation(tmp_path, mutate, expected) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_malformed_yaml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prior: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(bad)
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(scalar)


def test_presets_overlay_and_unknown_preset() -> None:
    paper = load_params(PARAMS, preset="paper-12b")
    assert (paper.prior.n_layers, paper.prior.d_model, paper.prior.n_heads) == (64, 3968, 62)
    assert paper.prior.d_model // paper.prior.n_heads == 64  # App. B.1: per-head state 64
    assert (paper.tokenizer.text_len, paper.tokenizer.vocab_size) == (256, 16384)  # §2.2
    assert paper.dvae.vocab_size == 8192 and paper.data.image_size == 256  # §2.1
    assert 2 ** (paper.dvae.group_count - 1) * 32 == 256  # 32x32 grid of image tokens
    assert paper.dvae.kl_max == 6.6 and paper.dvae.tau_final == 1 / 16  # §2.1
    assert paper.dvae.usage_weight == 0.0  # the paper's objective: no batch-usage term
    assert paper.distributed.powersgd.rank == 896  # Table 1
    # the preset leaves everything it does not mention as in params.yaml
    assert paper.tracking == load_params(PARAMS).tracking
    assert load_params(PARAMS, preset="cc3m-gpu").data.image_size == 256
    with pytest.raises(ConfigError, match="preset 'paper-13b' does not exist; known presets:"):
        resolve_preset("paper-13b")


def test_overrides_and_flatten_and_hash() -> None:
    params = load_params(PARAMS, overrides=["prior.n_layers=8", "data.synthetic.n_images=10"])
    assert params.prior.n_layers == 8 and params.data.synthetic.n_images == 10
    flat = flatten(params)
    assert flat["prior.n_layers"] == 8 and flat["seed"] == 0
    assert params_hash(params) != params_hash(load_params(PARAMS))
    assert params_hash(load_params(PARAMS)) == params_hash(load_params(PARAMS))
    with pytest.raises(ConfigError, match="must look like"):
        load_params(PARAMS, overrides=["prior.n_layers"])


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaf_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def test_params_yaml_is_where_every_default_lives(tmp_path) -> None:
    """No config class holds a default: each key of params.yaml is required, so removing any one
    of them is a one-line error naming it, and a preset can only restate keys that exist."""
    from dalle.config_sections import Params, Section

    def classes(model: type) -> list[type]:
        found = [model]
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
                found += classes(field.annotation)
        return found

    for cls in classes(Params):
        defaulted = [n for n, f in cls.model_fields.items() if not f.is_required()]
        assert not defaulted, f"{cls.__name__} has defaults for {defaulted}"
    raw = yaml.safe_load(PARAMS.read_text())
    leaves = _leaf_paths(raw)
    for dotted in leaves[::7]:  # a spread of keys over every section (all of them: ~1 min)
        def drop(r: dict, dotted: str = dotted) -> None:
            *parents, leaf = dotted.split(".")
            for part in parents:
                r = r[part]
            del r[leaf]
        with pytest.raises(ConfigError, match=f"{dotted}: missing required key"):
            load_params(_write(tmp_path, drop))
    for preset in sorted((REPO / "presets").glob("*.yaml")):
        extra = set(_leaf_paths(yaml.safe_load(preset.read_text()))) - set(leaves)
        assert not extra, f"{preset.name} sets keys params.yaml does not have: {sorted(extra)}"
