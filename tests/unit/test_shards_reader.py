"""`dalle.data.reader` on hand-written clean shards: manifest order, the split index, bad samples
skipped and counted (a missing shard, a truncated one, bytes that are not an image), one-line
errors."""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle.data.prepare import COLUMNS, _write_tar
from dalle.data.reader import BadSamples, decoded_mb, eval_captions, iterate, load_split, split_index
from dalle.errors import DataError
from tests.helpers import art_at


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def art(tmp_path):
    """Two train shards (3 + 2 samples) and one val shard (1), as prepare writes them."""
    art = art_at(tmp_path)
    art.clean.mkdir(parents=True)
    rows, layout = [], {("train", 0): [0, 1, 2], ("train", 1): [3, 4], ("val", 0): [5]}
    for (split, shard), items in layout.items():
        _write_tar(art.clean_shard(split, shard), [
            {"__key__": f"k{i}", "png": _png(10 * i), "txt": f"c{i}".encode()} for i in items])
        rows += [{"key": f"k{i}", "caption": f"c{i}", "split": split, "shard": shard, "index": j,
                  "width": 4, "height": 4, "source": "test"} for j, i in enumerate(items)]
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(art.clean_manifest)
    return art


def test_split_in_manifest_order(art):
    index = split_index(art, "train")
    assert len(index) == 5 and index.side == 4
    assert [n for _, n in index.shards] == [3, 2] and decoded_mb(index) == 5 * 48 / 2 ** 20
    train = load_split(art, "train")
    assert train.keys == [f"k{i}" for i in range(5)] and train.captions == [f"c{i}" for i in range(5)]
    assert train.images.shape == (5, 4, 4, 3) and train.images.dtype == np.uint8
    assert [int(im[0, 0, 0]) for im in train.images] == [0, 10, 20, 30, 40]
    assert [key for _, _, key in iterate(index, items=[4, 0])] == ["k4", "k0"]


def test_missing_shard_is_skipped_and_counted(art, caplog):
    art.clean_shard("train", 1).unlink()
    with pytest.raises(DataError, match=r"1 of 4 samples read could not be decoded .*train-00001.tar: item 0: FileNotFound"):
        load_split(art, "train")  # no bad sample allowed: one line
    with caplog.at_level(logging.WARNING):
        got = [key for _, _, key in iterate(split_index(art, "train"), bad=BadSamples(0.01, "t"))]
    assert got == ["k0", "k1", "k2"] and "skipped 1 undecodable sample" in caplog.text


def test_truncated_shard_and_bad_bytes_are_skipped(art):
    path = art.clean_shard("train", 0)
    data = path.read_bytes()
    path.write_bytes(data[:2600])  # 4 blocks of 512 a sample: cut inside the second one's image
    bad = BadSamples(0.01, "t")
    got = [key for _, _, key in iterate(split_index(art, "train"), bad=bad)]
    assert got[-2:] == ["k3", "k4"] and bad.seen == 5 and bad.bad == 5 - len(got) >= 1
    _write_tar(art.clean_shard("val", 0), [{"__key__": "k5", "png": b"not a png", "txt": b"c5"}])
    bad = BadSamples(0.01, "v")
    assert list(iterate(split_index(art, "val"), bad=bad)) == [] and bad.bad == 1


def test_past_the_fraction_stops_with_one_line(art):
    bad = BadSamples(0.001, "train split")
    bad.add(999, 0)
    with pytest.raises(DataError, match="2 of 1001 samples read could not be decoded"):
        bad.add(2, 2, "x.tar: k1: OSError")


def test_errors_are_one_line(art, tmp_path):
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_split(art, "test")
    with pytest.raises(DataError, match="eval_captions.parquet does not exist"):
        eval_captions(art)
    with pytest.raises(DataError, match="run the prepare stage"):
        load_split(art_at(tmp_path / "nope"), "val")
