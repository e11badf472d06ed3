"""folder (sidecar captions, COCO) and webdataset sources, including hostile tar members."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from dalle.config_sections import Data
from dalle.data.folder import collect_folder
from dalle.data.webdataset_source import collect_webdataset
from dalle.errors import DataError
from dalle.runner import run_guarded
from dalle.tracking import NullTracker
from tests.helpers import data_section, raw_art
from tests.integration.data_server import jpeg, make_image

SYNTH = {"n_images": 10, "min_objects": 1, "max_objects": 1, "jitter": 0.0, "background_tint": 0.0}


def make_data(source: str, **section) -> Data:
    return data_section(source, image_size=32, shard_size=3, val_fraction=0.2, synthetic=SYNTH,
                        **{source: dict({"min_side": 16}, **section)})


def manifest(raw: Path) -> pd.DataFrame:
    return pd.read_parquet(raw / "manifest.parquet").set_index("url")


def test_folder_with_sidecar_captions(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.jpg", "sub/c.jpg", "nocap.jpg"]):
        (src / name).write_bytes(jpeg(make_image(i)))
        if name != "nocap.jpg":
            (src / name).with_suffix(".txt").write_text(f"picture {i}\n")
    (src / "broken.jpg").write_bytes(b"not really a jpeg")
    (src / "broken.txt").write_text("broken")
    raw = tmp_path / "raw"
    metrics = collect_folder(make_data("folder", path=str(src)), raw_art(raw), NullTracker(), 0)
    rows = manifest(raw)
    assert metrics["ok"] == 3 and metrics["failed"] == 2 and len(rows) == 5
    assert rows.loc["sub/c.jpg", "caption"] == "picture 2"
    assert rows.loc["nocap.jpg", "error"].startswith("no_caption")
    assert rows.loc["broken.jpg", "error"].startswith("not_an_image")
    assert sorted(p.name for p in raw.glob("*.parquet")) == ["00000.parquet", "00001.parquet",
                                                             "manifest.parquet"]


def test_coco_captions_json(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for i in (1, 2):
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(jpeg(make_image(10 + i)))
    doc = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
           "annotations": [{"id": 7, "image_id": 1, "caption": "second caption"},
                           {"id": 5, "image_id": 1, "caption": "A dog on a sofa."},
                           {"id": 9, "image_id": 2, "caption": "A cat."},
                           {"id": 11, "image_id": 3, "caption": "Gone."}]}
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(doc))
    raw = tmp_path / "raw"
    metrics = collect_folder(make_data("folder", path=str(root)), raw_art(raw), NullTracker(), 0)
    rows = manifest(raw)
    assert metrics["ok"] == 2 and rows.loc["000000000001.jpg", "caption"] == "A dog on a sofa."
    assert rows.loc["000000000003.jpg", "error"].startswith("missing_image")


def _tar(path: Path, members: list[tuple[str, bytes]], links: list[tuple[str, str]] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def _sample(key: str, seed: int) -> list[tuple[str, bytes]]:
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"}
    return [(f"{key}.jpg", jpeg(make_image(seed))), (f"{key}.txt", f"sample {key}".encode()),
            (f"{key}.json", json.dumps(meta).encode())]


def test_webdataset_shards_are_ingested(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    _tar(src / "00000.tar", _sample("000000000", 1) + _sample("000000001", 2))
    _tar(src / "00001.tar", _sample("000010000", 3) + [("000010001.txt", b"caption only")])
    raw = tmp_path / "raw"
    data = make_data("webdataset", paths=[str(src / "*.tar")])
    metrics = collect_webdataset(data, raw_art(raw), NullTracker(), 0)
    rows = manifest(raw)
    assert metrics["ok"] == 3 and metrics["input_tars"] == 2
    assert rows.loc["http://example.com/000010000.jpg", "caption"] == "sample 000010000"
    assert metrics["shards_written"] == 2
    again = collect_webdataset(data, raw_art(raw), NullTracker(), 0)
    assert again["shards_written"] == 0 and again["ok"] == 3  # resumed: nothing redone
    bigger = data.model_copy(update={"image_size": 48})
    with pytest.raises(DataError, match="other inputs \\(image_size: 32 -> 48\\)"):
        collect_webdataset(bigger, raw_art(raw), NullTracker(), 0)  # never mix old shards


@pytest.mark.parametrize("evil", [
    {"members": [("../evil.txt", b"x")]},
    {"members": [("/tmp/dalle-abs-evil.txt", b"x")]},
    {"members": [], "links": [("000000009.jpg", "/etc/passwd")]},
])
def test_hostile_tar_members_never_escape(tmp_path, capsys, evil):
    src = tmp_path / "in"
    src.mkdir()
    _tar(src / "00000.tar", _sample("000000000", 1) + evil["members"], evil.get("links", []))
    raw = tmp_path / "out" / "raw"
    data = make_data("webdataset", paths=[str(src / "00000.tar")])
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        run_guarded(lambda: collect_webdataset(data, raw_art(raw), NullTracker(), 0))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # no bars
    assert info.value.code == 1 and len(err) == 1 and "00000.tar" in err[0], err
    created = {p for p in set(tmp_path.rglob("*")) - before if raw not in p.parents and p != raw}
    assert created <= {tmp_path / "out"}, created
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/dalle-abs-evil.txt").exists()
    assert not (raw / "manifest.parquet").exists()


@pytest.mark.parametrize("source,section,match", [
    ("folder", {"path": "/nonexistent/photos"}, "does not exist"),
    ("folder", {}, "path is not set"),
    ("webdataset", {"paths": ["/nonexistent/*.tar"]}, "matches no tar"),
])
def test_bad_local_sources_are_one_line(tmp_path, source, section, match):
    data = make_data(source, **section)
    fn = collect_folder if source == "folder" else collect_webdataset
    with pytest.raises(DataError, match=match):
        fn(data, raw_art(tmp_path / "raw"), NullTracker(), 0)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        collect_folder(make_data("folder", path=str(tmp_path / "empty")),
                       raw_art(tmp_path / "raw"), NullTracker(), 0)
