"""`dalle.data.reader`: clean rows only, raw fallback with a warning, one-line errors."""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle.data import shards
from dalle.data.reader import eval_captions, load_split
from dalle.errors import DataError
from tests.helpers import art_at


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def paths(tmp_path):
    art = art_at(tmp_path)
    raw = art.raw
    samples = [shards.Sample(key=f"k{i}", caption=f"c{i}", image_bytes=_png(10 * i), meta={"i": i})
               for i in range(4)]
    shards.write_shard(raw, 0, samples, lambda k: "val" if k == "k3" else "train")
    shards.finalize(raw, art.raw_manifest)
    return art


def test_raw_fallback_warns_and_reads_images(paths, caplog):
    with caplog.at_level(logging.WARNING):
        train = load_split(paths, "train")
    assert "dedup has not run" in caplog.text
    assert train.keys == ["k0", "k1", "k2"] and train.captions == ["c0", "c1", "c2"]
    assert train.images.shape == (3, 4, 4, 3) and train.images.dtype == np.uint8
    assert train.images[2, 0, 0, 0] == 20 and train.meta[1]["i"] == 1
    assert load_split(paths, "val").keys == ["k3"] and len(load_split(paths, "train", limit=2)) == 2


def test_clean_manifest_drops_duplicates(paths, tmp_path):
    clean = pd.read_parquet(paths.raw_manifest)
    clean["dup_of"] = [None, "k0", None, None]
    paths.clean.mkdir(parents=True)
    clean.to_parquet(paths.clean_manifest)
    assert load_split(paths, "train").keys == ["k0", "k2"]


def test_errors_are_one_line(paths, tmp_path):
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_split(paths, "test")
    with pytest.raises(DataError, match="eval_captions.parquet does not exist"):
        eval_captions(paths)
    (paths.raw / "00000.tar").unlink()
    with pytest.raises(DataError, match="00000.tar is missing"):
        load_split(paths, "train")
    with pytest.raises(DataError, match="run the collect stage"):
        load_split(art_at(tmp_path / "nope"), "val")
