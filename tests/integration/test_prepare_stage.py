"""`prepare` (decode once, filter, clean shards) and the reader's two paths on a tiny world:
bytes copied when they fit, one clean shard per raw shard and split, the filters' counts, a
killed run resumed, undecodable samples skipped and counted, and the streaming path serving the
same samples as the in-memory one."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.data import shards
from dalle.data.reader import load_split, split_index
from dalle.data.stream import StreamingBatches
from dalle.errors import DataError
from tests.helpers import stage_main

REPO = Path(__file__).resolve().parents[2]
SETS = {"tracking.enabled": "false", "data.synthetic.n_images": 300, "data.shard_size": 100,
        "data.image_size": 32}


def _args(root: Path, **extra: object) -> list[str]:
    sets = {**SETS, **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "metrics")}, **extra}
    return ["--params", str(REPO / "params.yaml"), *(a for k, v in sets.items() for a in ("-S", f"{k}={v}"))]


def _art(root: Path, **extra: object) -> Artefacts:
    args = _args(root, **extra)
    return Artefacts(load_params(REPO / "params.yaml", overrides=args[3::2]).paths)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepare")
    for stage in ("collect", "dedup", "prepare"):
        stage_main(stage)(_args(root))
    return root


def test_clean_shards_copy_the_bytes_and_follow_the_raw_shards(world: Path) -> None:
    art = _art(world)
    manifest = pd.read_parquet(art.clean_manifest)
    metrics = json.loads(art.metrics("prepare").read_text())
    assert len(manifest) == metrics["kept"] == metrics["copied"] == 300  # nothing re-encoded
    assert metrics["kept_train"] + metrics["kept_val"] == 300
    assert sorted(p.name for p in art.clean.glob("*.tar")) == [
        f"{s}-{i:05d}.tar" for s in ("train", "val") for i in range(3)]
    raw = {k: data for i in range(3) for k, _e, data, _c, _m in
           shards.iter_tar(shards.shard_file(art.raw, i, ".tar"))}
    clean = {k: data for p in art.clean.glob("*.tar") for k, _e, data, _c, _m in shards.iter_tar(p)}
    assert clean == {k: raw[k] for k in manifest["key"]}  # the PNG bytes, untouched
    assert art.eval_captions.read_bytes() == art.raw_eval_captions.read_bytes()


def test_in_memory_and_streaming_serve_the_same_samples(world: Path) -> None:
    art = _art(world)
    split = load_split(art, "val")
    assert split.images.shape[1:] == (32, 32, 3) and len(split) == len(split_index(art, "val"))
    cfg = load_params(REPO / "params.yaml", overrides=["loader.workers=0", "loader.chunk=16"]).loader
    stream = StreamingBatches(split_index(art, "val"), cfg, per_rank=10, seed=0)
    n = len(split)
    got = [stream.batch(step) for step in range(-(-n // 10))]
    images = np.concatenate([g[0].numpy() for g in got])[:n]
    captions = [c for g in got for c in g[1]][:n]
    order = {c: i for i, c in enumerate(split.captions)}
    assert sorted(captions) == sorted(split.captions)  # one epoch: every sample once
    first = split.captions.index(captions[0])
    assert np.array_equal(images[0], split.images[first]) and order  # same pixels for a caption
    resumed = StreamingBatches(split_index(art, "val"), cfg, per_rank=10, seed=0)
    assert resumed.batch(3)[1] == got[3][1]  # a resumed stream continues at the same sample


def test_a_killed_prepare_resumes_byte_identical(world: Path, tmp_path: Path) -> None:
    shutil.copytree(world, tmp_path / "w")
    art = _art(tmp_path / "w")
    before = {p.name: p.read_bytes() for p in art.clean.iterdir()}
    (art.clean / ".00001.done.json").unlink()  # as if killed before raw shard 1 was done
    art.clean_shard("train", 1).unlink()
    stage_main("prepare")(_args(tmp_path / "w"))
    assert {p.name: p.read_bytes() for p in art.clean.iterdir()} == before


def test_jpeg_is_reencoded_and_read_back(world: Path, tmp_path: Path) -> None:
    shutil.copytree(world, tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "clean")
    stage_main("prepare")(_args(tmp_path / "w", **{"prepare.image_format": "jpg"}))
    art = _art(tmp_path / "w")
    metrics = json.loads(art.metrics("prepare").read_text())
    assert metrics["reencoded"] == 300 and "copied" not in metrics
    assert load_split(art, "train").images.dtype == np.uint8


def test_undecodable_samples_are_counted_then_stop_in_one_line(world: Path, tmp_path: Path,
                                                                caplog) -> None:
    shutil.copytree(world, tmp_path / "w")
    art = _art(tmp_path / "w")
    tar = art.clean_shard("val", 0)
    tar.write_bytes(tar.read_bytes()[:2000])  # truncated mid-shard
    with pytest.raises(DataError, match=r"could not be decoded .*max_bad_fraction=0.0"):
        load_split(art, "val", max_bad_fraction=0.0)
    split = load_split(art, "val", max_bad_fraction=0.5)  # tolerated: skipped and counted
    assert 0 < len(split) < len(split_index(art, "val")) and "undecodable" in caplog.text
    tar.unlink()  # a missing shard reads the same way
    assert len(load_split(art, "val", max_bad_fraction=0.5)) == len(split)


def test_filters_drop_web_junk_with_counted_reasons(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    cases = {"ok": ((200, 150), "a dog on a beach"), "wide": ((500, 100), "a long banner"),
             "tiny": ((40, 40), "a small icon"), "junk": ((200, 200), "stock photo of a dog"),
             "short": ((200, 200), "dog"), "empty": ((200, 200), "   ")}
    rng = np.random.default_rng(0)
    for name, (size, caption) in cases.items():  # noise: no two images are near-duplicates
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
        (photos / f"{name}.png").write_bytes(buf.getvalue())
        (photos / f"{name}.txt").write_text(caption)
    extra = {"data.source": "folder", "data.folder.path": photos, "data.folder.min_side": 8,
             "data.val_fraction": 0.01, "prepare.filters.caption_words": "[2, 20]",
             "data.image_size": 64}  # min_side 64 is not capped below the tiny icon's 40
    for stage in ("collect", "dedup", "prepare"):
        stage_main(stage)(_args(tmp_path, **extra))
    metrics = json.loads(_art(tmp_path).metrics("prepare").read_text())
    assert metrics["kept"] == 1, metrics
    assert {k: v for k, v in metrics.items() if k.startswith("removed_")} == {
        "removed_aspect": 1, "removed_min_side": 1, "removed_boilerplate": 1,
        "removed_caption_length": 1}  # the blank caption never became a sample (collect)
