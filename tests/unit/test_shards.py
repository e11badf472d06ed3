"""Shard layer: img2dataset layout, completion marker, byte-identical reruns, safe tar reading."""
from __future__ import annotations

import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle.data import shards
from dalle.errors import DataError


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _samples() -> list[shards.Sample]:
    ok = [shards.Sample(key=f"0000{i}", caption=f"cap {i}", image_bytes=_png(i), ext="png",
                        meta={"i": i}, url=f"u{i}", source="t") for i in range(3)]
    bad = shards.Sample(key="00009", caption="gone", image_bytes=None, status="failed",
                        error="http_404: not found", url="u9", source="t")
    return ok + [bad]


def test_write_shard_layout_and_rows(tmp_path):
    stats = shards.write_shard(tmp_path, 3, _samples(), lambda k: "val" if k == "00001" else "train")
    assert (stats.count, stats.successes, stats.failed_to_download) == (4, 3, 1)
    assert {p.name for p in tmp_path.iterdir()} == {"00003.tar", "00003.parquet", "00003_stats.json"}
    assert json.loads((tmp_path / "00003_stats.json").read_text())["status_dict"] == {"http_404": 1}
    rows = pd.read_parquet(tmp_path / "00003.parquet")
    assert tuple(rows.columns) == shards.MANIFEST_COLUMNS
    assert list(rows["status"]) == ["ok", "ok", "ok", "failed"]
    assert rows.loc[3, "error"] == "http_404: not found" and pd.isna(rows.loc[3, "sha256"])
    assert list(rows["split"]) == ["train", "val", "train", "train"]
    assert (rows.loc[0, "width"], rows.loc[0, "height"], rows.loc[0, "shard"]) == (12, 8, 3)
    members = list(shards.iter_tar(tmp_path / "00003.tar"))
    assert [m[0] for m in members] == ["00000", "00001", "00002"]  # failed rows: manifest only
    key, ext, data, caption, meta = members[1]
    assert (ext, data, caption, meta["i"], meta["url"]) == ("png", _png(1), "cap 1", 1, "u1")
    import hashlib
    assert rows.loc[1, "sha256"] == hashlib.sha256(_png(1)).hexdigest()


def test_rewrite_is_byte_identical_and_finalize_concatenates(tmp_path):
    split = lambda k: "train"  # noqa: E731
    shards.write_shard(tmp_path, 0, _samples()[:2], split)
    shards.write_shard(tmp_path, 1, _samples()[2:], split)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "00001.parquet").unlink()
    assert shards.completed_shards(tmp_path) == {0}
    shards.write_shard(tmp_path, 1, _samples()[2:], split)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    manifest = shards.finalize(tmp_path, tmp_path / "manifest.parquet")
    assert list(manifest["key"]) == ["00000", "00001", "00002", "00009"]
    assert list(manifest["shard"]) == [0, 0, 1, 1]
    assert shards.completed_shards(tmp_path) == {0, 1}  # manifest.parquet is not a shard
    assert pd.read_parquet(tmp_path / "manifest.parquet").equals(manifest)


def test_duplicate_or_unsafe_keys_refused(tmp_path):
    dup = _samples()[:1] * 2
    with pytest.raises(DataError, match="'00000' is duplicated"):
        shards.write_shard(tmp_path, 0, dup, lambda k: "train")
    assert shards.completed_shards(tmp_path) == set()


def test_split_fn_is_deterministic_and_near_fraction():
    cfg = SimpleNamespace(val_fraction=0.2)
    fn = shards.split_fn(cfg, 3)
    keys = [f"{i:09d}" for i in range(5000)]
    splits = [fn(k) for k in keys]
    assert splits == [shards.split_fn(cfg, 3)(k) for k in keys]
    assert 0.18 < splits.count("val") / len(keys) < 0.22
    assert splits != [shards.split_fn(cfg, 4)(k) for k in keys]


def _tar_with(path, info: tarfile.TarInfo, data: bytes = b"x") -> None:
    with tarfile.open(path, "w") as tar:
        tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


@pytest.mark.parametrize("name,kind", [("../evil.png", tarfile.REGTYPE), ("/abs.png", tarfile.REGTYPE),
                                       ("a/../../b.png", tarfile.REGTYPE), ("link.png", tarfile.SYMTYPE),
                                       ("hard.png", tarfile.LNKTYPE), ("dev.png", tarfile.CHRTYPE)])
def test_iter_tar_refuses_hostile_members(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 1 if kind == tarfile.REGTYPE else 0
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    _tar_with(tmp_path / "bad.tar", info)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        list(shards.iter_tar(tmp_path / "bad.tar"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_iter_tar_reads_img2dataset_style_and_rejects_garbage(tmp_path):
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for name, data in [("000000001.jpg", b"J"), ("000000001.txt", b"a cat"),
                           ("000000001.json", b'{"url": "u"}'), ("000000002.txt", b"no image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(shards.iter_tar(tmp_path / "x.tar"))
    assert got[0] == ("000000001", "jpg", b"J", "a cat", {"url": "u"})
    assert got[1][0] == "000000002" and got[1][2] is None and got[1][3] == "no image"
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(DataError, match="junk.tar"):
        list(shards.iter_tar(tmp_path / "junk.tar"))


def test_control_characters_in_captions_become_spaces(tmp_path):
    img = _png(1)
    samples = [shards.Sample(key="00000", caption="a red\x00 circle\x1b[31m\x07\n", image_bytes=img),
               shards.Sample(key="00001", caption="\x00\x1b\x07", image_bytes=img),
               shards.Sample(key="00002", caption="café ✓ sign", image_bytes=img)]
    shards.write_shard(tmp_path, 0, samples, lambda k: "train")
    rows = pd.read_parquet(tmp_path / "00000.parquet")
    assert list(rows["caption"]) == ["a red  circle [31m", "", "café ✓ sign"]
    assert list(rows["status"]) == ["ok", "failed", "ok"]
    assert rows["error"][1] == "no_caption: only control characters"
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.extractfile("00000.txt").read() == "a red  circle [31m".encode()
        assert "00001.txt" not in tar.getnames()
