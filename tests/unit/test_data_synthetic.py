"""The synthetic world: determinism, vocabulary coverage, captions <-> specs, holdout split."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.data import shards
from dalle.data.synthetic import check_holdout, collect_synthetic, scene
from dalle.data.synthetic_captions import COLOURS, POSITIONS, SHAPES, SIZES, combo, parse_caption
from dalle.errors import ConfigError
from dalle.tracking import NullTracker


def _params(repo_root, tmp_path, *sets: str):
    return load_params(repo_root / "params.yaml", overrides=[
        f"paths.raw={tmp_path / 'raw'}", "data.shard_size=100", "data.synthetic.n_images=250",
        "data.eval_captions=30", "data.synthetic.max_objects=3", *sets])


def test_scene_is_deterministic_and_any_size(repo_root, tmp_path):
    cfg = _params(repo_root, tmp_path).data.synthetic
    a, b = scene(cfg, 64, 7, 0), scene(cfg, 64, 7, 0)
    assert a[0] == b[0] and a[1] == b[1] and np.array_equal(np.asarray(a[3]), np.asarray(b[3]))
    assert scene(cfg, 64, 8, 0)[1] != a[1] or scene(cfg, 64, 8, 0)[0] != a[0]
    for size in (32, 128):
        big = scene(cfg, size, 7, 0)
        assert big[0] == a[0] and np.asarray(big[3]).shape == (size, size, 3)
    img = np.asarray(a[3]).astype(int)  # anti-aliased: edge pixels between bg and fill
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10


def test_vocabulary_is_covered_and_captions_parse_back(repo_root, tmp_path):
    cfg = _params(repo_root, tmp_path).data.synthetic
    seen: Counter = Counter()
    for i in range(600):
        spec, text, placed, _ = scene(cfg, 64, i, 0)
        parsed = parse_caption(text)
        for want, got in zip(spec["objects"], parsed["objects"]):
            assert (want["colour"], want["shape"], want["size"]) == (got["colour"], got["shape"], got["size"]), text
            if spec["relation"] != "pair":
                assert want["position"] == got["position"], text
        assert parsed["relation"] == spec["relation"], text
        seen.update(("c", o["colour"]) for o in spec["objects"])
        seen.update(("s", o["shape"]) for o in spec["objects"])
        seen.update(("z", o["size"]) for o in spec["objects"])
        seen.update(("p", o["position"]) for o in spec["objects"])
        seen.update([("n", len(spec["objects"])), ("t", text)])
    assert {c for k, c in seen if k == "c"} == set(COLOURS) and len(COLOURS) >= 6
    assert {s for k, s in seen if k == "s"} == set(SHAPES) >= {"circle", "square", "triangle"}
    assert {z for k, z in seen if k == "z"} == set(SIZES)
    assert {p for k, p in seen if k == "p"} >= set(POSITIONS)
    assert {n for k, n in seen if k == "n"} == {1, 2, 3}
    assert sum(1 for k, _ in seen if k == "t") > 500  # captions vary (templates, synonyms)


def test_collect_holdout_only_in_val_and_eval_captions(repo_root, tmp_path):
    params = _params(repo_root, tmp_path)
    metrics = collect_synthetic(params.data, Artefacts(params.paths), NullTracker(), 0, workers=1)
    raw = tmp_path / "raw"
    manifest = pd.read_parquet(raw / "manifest.parquet")
    assert len(manifest) == metrics["rows"] == 250 and shards.completed_shards(raw) == {0, 1, 2}
    holdout = set(params.data.synthetic.holdout)
    held_in_train = 0
    for key, _ext, _img, _cap, meta in shards.iter_tar(raw / "00000.tar"):
        split = manifest.set_index("key").loc[key, "split"]
        has = any(combo(o) in holdout for o in meta["spec"]["objects"])
        held_in_train += has and split == "train"
        assert meta["holdout"] == has
    assert held_in_train == 0 and metrics["val"] > 0.1 * 250
    evals = pd.read_parquet(raw / "eval_captions.parquet")
    assert list(evals.columns) == ["caption_id", "caption", "combo", "spec"]
    assert Counter(evals["combo"]) == {"seen": 30, "holdout": 30}
    for _, row in evals.iterrows():
        spec = json.loads(row["spec"])
        assert any(combo(o) in holdout for o in spec["objects"]) == (row["combo"] == "holdout")
        assert parse_caption(row["caption"])["objects"][0]["colour"] == spec["objects"][0]["colour"]


@pytest.mark.parametrize("bad", ["pink circle", "red hexagon", "red"])
def test_bad_holdout_is_one_config_error(repo_root, tmp_path, bad):
    cfg = _params(repo_root, tmp_path, f"data.synthetic.holdout=[{bad}]").data.synthetic
    with pytest.raises(ConfigError, match=f"'{bad}'"):
        check_holdout(cfg)
