"""Round two, classes 3, 4, 5 and 13 on the data side (docs/reliability.md): text that is not
valid Unicode, malformed COCO files, hostile shard members, and images checked from their header
before any pixel is decoded. Each case runs the collect stage in this process on a tiny input
with two good samples and must end in success with the bad sample's reason in the manifest, or
in exactly one `error:` line."""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dalle.data import shards
from dalle.data.images import ImageRejected, decode_rgb
from stages.collect import STAGE as COLLECT
from tests.integration.data_server import bomb_png
from tests.reliability.conftest import write_params
from tests.reliability.inprocess import Seen, seen
from tests.reliability.malformed_cases import png


def _collect(case: Path, extra: dict[str, Any]) -> tuple[Seen, pd.DataFrame]:
    params = write_params(case, {"data.image_size": 16, **extra})
    out = seen(lambda: COLLECT.main(["--params", str(params)]))
    manifest = pd.read_parquet(case / "raw" / "manifest.parquet") if out.code == 0 else pd.DataFrame()
    return out, manifest


def _row(manifest: pd.DataFrame, url_part: str) -> dict[str, Any]:
    rows = manifest[manifest["url"].astype(str).str.contains(url_part, regex=False)]
    assert len(rows) == 1, manifest[["url", "status", "error"]]
    return rows.iloc[0].to_dict()


# ------------------------------------------------------------------ class 3: not valid Unicode
def _folder(case: Path) -> Path:
    root = case / "in"
    root.mkdir(parents=True)
    for i in range(2):
        (root / f"good{i}.png").write_bytes(png(i))
        (root / f"good{i}.txt").write_text(f"a good picture {i}")
    return root


FOLDER = {"data.source": "folder", "data.folder.min_side": 16, "data.folder.image_format": "png"}
WDS = {"data.source": "webdataset", "data.webdataset.min_side": 16, "data.webdataset.image_format": "png"}


def test_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:  # listed
    root = _folder(tmp_path)
    base = os.fsencode(root)
    with open(os.path.join(base, b"caf\xe9.png"), "wb") as fh:
        fh.write(png(3))
    with open(os.path.join(base, b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"a picture with a latin-1 name")
    out, manifest = _collect(tmp_path, {**FOLDER, "data.folder.path": str(root)})
    assert out.code == 0, out.stderr[-2000:]
    row = _row(manifest, "caf\ufffd.png")
    assert row["status"] == "ok" and row["caption"] == "a picture with a latin-1 name"


def _coco(case: Path, images: Any, annotations: Any) -> Path:
    root = _folder(case)
    for i in range(2):
        (root / f"c{i}.png").write_bytes(png(10 + i))
    good_images = [{"id": 1, "file_name": "c0.png"}, {"id": 2, "file_name": "c1.png"}]
    good_anns = [{"id": 1, "image_id": 1, "caption": "a first picture"},
                 {"id": 2, "image_id": 2, "caption": "a second picture"}]
    doc = {"images": good_images + images if isinstance(images, list) else images,
           "annotations": good_anns + annotations if isinstance(annotations, list) else annotations}
    (root / "captions_val.json").write_text(json.dumps(doc))
    return root


def test_a_lone_surrogate_in_a_coco_caption(tmp_path: Path) -> None:  # listed
    root = _coco(tmp_path, [{"id": 3, "file_name": "good0.png"}],
                 [{"id": 3, "image_id": 3, "caption": "a \ud800 broken caption"}])
    out, manifest = _collect(tmp_path, {**FOLDER, "data.folder.path": str(root)})
    assert out.code == 0, out.stderr[-2000:]
    assert _row(manifest, "good0.png")["caption"] == "a \ufffd broken caption"


def _tar(case: Path, members: list[tuple[str | bytes, bytes]], mode: str = "w") -> Path:
    path = case / ("input.tar" if mode == "w" else "input.tar.gz")
    case.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.USTAR_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in [("g0.png", png(1)), ("g0.txt", b"a good one"), ("g1.png", png(2)),
                           ("g1.txt", b"another good one"), *members]:
            info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_lone_surrogate_in_a_member_json(tmp_path: Path) -> None:  # listed
    tar = _tar(tmp_path, [("bad.png", png(3)), ("bad.txt", b"a caption"),
                          ("bad.json", b'{"note": "x \\ud800 y", "url": "http://x/\\udcff"}')])
    out, manifest = _collect(tmp_path, {**WDS, "data.webdataset.paths": [str(tar)]})
    assert out.code == 0, out.stderr[-2000:]
    row = _row(manifest, "\ufffd")
    assert row["status"] == "ok" and row["url"] == "http://x/\ufffd"
    metas = [m for *_, m in shards.iter_tar(tmp_path / "raw" / "00000.tar")]
    assert {"x \ufffd y"} <= {m.get("note") for m in metas}


def test_a_url_list_with_a_latin1_caption_is_read(tmp_path: Path) -> None:  # ours
    """One undecodable byte in one caption used to refuse the whole list (UnicodeDecodeError)."""
    from dalle.data.url_list import read_url_list
    from tests.helpers import params

    (tmp_path / "u.tsv").write_bytes(b"url\tcaption\nhttp://x/a.png\tcaf\xe9 au lait\n")
    cfg = params(**{"data.url_list.path": str(tmp_path / "u.tsv")}).data.url_list
    assert list(read_url_list(cfg)["caption"]) == ["caf\ufffd au lait"]


def test_a_member_name_that_is_not_utf8(tmp_path: Path) -> None:  # ours
    tar = _tar(tmp_path, [(b"b\xe9d.png", png(3)), (b"b\xe9d.txt", b"a caption")])
    out, manifest = _collect(tmp_path, {**WDS, "data.webdataset.paths": [str(tar)]})
    assert out.code == 0, out.stderr[-2000:]
    assert _row(manifest, "b\ufffdd")["status"] == "ok"


# ------------------------------------------------------------------ class 4: malformed COCO
COCO_ROWS = [  # (images added, annotations added, file_name or url part, expected error kind)
    ([3], [], "images[", "bad_entry"),  # listed: images given as ints (one among good ones)
    ([{"id": "3", "file_name": "good0.png"}], [{"id": "z", "image_id": "3", "caption": "by a string id"},
                                            {"id": 9, "image_id": "3", "caption": "another"}],
     "good0.png", None),  # listed: mixed id types (image and annotation ids)
    ([{"id": 5, "file_name": "good1.png"}], [{"id": 5, "image_id": 5, "caption": None}], "good1.png",
     "no_caption"),  # listed: a null caption is no caption, not the text "None"
    ([{"id": 6, "file_name": "/etc/hostname"}], [{"id": 6, "image_id": 6, "caption": "x"}],
     "/etc/hostname", "unsafe_path"),  # listed: absolute
    ([{"id": 7, "file_name": "../outside.png"}], [{"id": 7, "image_id": 7, "caption": "x"}],
     "../outside.png", "unsafe_path"),  # listed: ../
    ([{"id": 8, "file_name": "good0.png\x00.txt"}], [{"id": 8, "image_id": 8, "caption": "x"}],
     "\x00", "unsafe_path"),  # ours: a NUL byte
]


@pytest.mark.parametrize("images,annotations,where,kind", COCO_ROWS,
                         ids=["images-ints", "mixed-ids", "null-caption", "absolute", "dotdot", "nul"])
def test_malformed_coco_entries_are_their_rows_errors(tmp_path: Path, images: Any, annotations: Any,
                                                      where: str, kind: str | None) -> None:
    (tmp_path / "outside.png").write_bytes(png(20))
    root = _coco(tmp_path, images, annotations)
    out, manifest = _collect(tmp_path, {**FOLDER, "data.folder.path": str(root)})
    assert out.code == 0, out.stderr[-2000:]
    assert (manifest["status"] == "ok").sum() >= 2
    row = _row(manifest, where)
    if kind is None:
        assert row["status"] == "ok" and row["caption"] == "another", row
    else:
        assert row["status"] == "failed" and str(row["error"]).startswith(kind), row
    assert "None" not in set(manifest["caption"].astype(str))
    print(f"{where!r}: {row['status']} {row['error']}")


@pytest.mark.parametrize("doc,needle", [
    ({"images": [1, 2], "annotations": []}, "bad_entry: images[0]"),  # listed: images as ints
    ({"images": {"1": "a.png"}, "annotations": []}, "'images' must be a list"),  # listed: a dict
    ({"images": [], "annotations": 5}, "'annotations' must be a list"),  # ours
    ([1, 2], "holds a list"),  # ours
    ("[" * 100_000 + "]" * 100_000, "is not valid"),  # ours: nested past the recursion limit
], ids=["images-ints", "images-dict", "annotations-int", "top-level-list", "deep-nesting"])
def test_malformed_coco_files_are_one_line(tmp_path: Path, doc: Any, needle: str) -> None:
    root = _folder(tmp_path)
    (root / "captions_val.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    out, _ = _collect(tmp_path, {**FOLDER, "data.folder.path": str(root)})
    line = out.clean_error()
    assert needle in line, line
    print(line)


# ------------------------------------------------------------------ class 5: hostile members
def _zeros_tar_gz(path: Path, size: int) -> None:
    class Zeros(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            n = min(len(buf), self.left)
            buf[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in (("g0.png", png(1)), ("g0.txt", b"a good one"), ("g1.png", png(2)),
                           ("g1.txt", b"another")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.png")
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros()))


def test_a_compressed_member_bomb_is_never_expanded(tmp_path: Path) -> None:  # listed
    tmp_path.mkdir(exist_ok=True)
    tar = tmp_path / "input.tar.gz"
    _zeros_tar_gz(tar, 256 << 20)  # 256 MiB of zeros, ~0.25 MB on disk
    tracemalloc.start()
    found = {s.key: s for s in shards.read_samples(tar, max_bytes=1 << 20)}
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found["bomb"].image is None and found["bomb"].error.startswith("too_large")
    assert peak < 16 << 20, f"{peak} bytes were allocated reading it"
    out, manifest = _collect(tmp_path, {**WDS, "data.webdataset.paths": [str(tar)],
                                        "data.webdataset.max_bytes": 1 << 20})
    assert out.code == 0, out.stderr[-2000:]
    assert str(_row(manifest, "#bomb")["error"]).startswith("too_large")
    print(f"{tar.stat().st_size} bytes on disk, 256 MiB declared: refused, peak {peak} bytes")


@pytest.mark.parametrize("members,kind", [
    ([("bad.png", png(3)), ("bad.json", b"[" * 100_000)], "bad_metadata"),  # listed: past ValueError
    ([("bad.png", png(3)), ("bad.json", b"[1, 2]")], "bad_metadata"),  # ours: not an object
    ([("bad.png", png(3))] + [(f"bad.{i}.txt", b"x") for i in range(80)], "too_large"),  # ours
], ids=["json-recursion", "json-list", "too-many-members"])
def test_a_bad_member_is_its_samples_error(tmp_path: Path, members: list, kind: str) -> None:
    tar = _tar(tmp_path, members)
    out, manifest = _collect(tmp_path, {**WDS, "data.webdataset.paths": [str(tar)]})
    assert out.code == 0, out.stderr[-2000:]
    row = _row(manifest, "#bad")
    assert row["status"] == "failed" and str(row["error"]).startswith(kind), row
    assert (manifest["status"] == "ok").sum() == 2


# ------------------------------------------------------------------ class 13: header first
def test_decoding_checks_the_header_first() -> None:  # ours: the readers' decode_rgb
    start = time.monotonic()
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        decode_rgb(bomb_png(30000, 30000))
    assert time.monotonic() - start < 1.0
    assert decode_rgb(png(1, size=16)).shape == (16, 16, 3)
