"""`python -m stages.dedup` on tiny raw shards: duplicates within a split, overlap across splits."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dalle.data import shards
from tests.helpers import stage_main
from tests.integration.data_server import make_image

dedup_main = stage_main("dedup")

SPLITS = {"v": "val", "t": "train"}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _sample(key: str, data: bytes, ext: str = "png", status: str = "ok") -> shards.Sample:
    return shards.Sample(key=key, caption=f"caption {key}", image_bytes=data if status == "ok" else None,
                         ext=ext, meta={}, status=status, error=None if status == "ok" else "http_404: x",
                         url=f"http://example.com/{key}", source="test")


def build_raw(raw: Path) -> None:
    pics = [make_image(500 + i, (64, 64)) for i in range(12)]
    train = [_sample(f"t{i:02d}", _png(p)) for i, p in enumerate(pics[:10])]
    train.append(_sample("t10", _png(pics[0])))  # exact copy of t00
    train.append(_sample("t11", _jpeg(pics[1], 60), "jpg"))  # near copy of t01
    train.append(_sample("t12", b"", status="failed"))
    val = [_sample("v00", _jpeg(pics[2], 70), "jpg"),  # near copy of train t02: overlap
           _sample("v01", _png(pics[10])), _sample("v02", _png(pics[11])),
           _sample("v03", _png(pics[11]))]  # exact copy of v02 (within val)
    split = lambda key: SPLITS[key[0]]  # noqa: E731
    shards.write_shard(raw, 0, train[:7], split)
    shards.write_shard(raw, 1, train[7:] + val, split)
    shards.finalize(raw, raw / "manifest.parquet")


def _args(tmp_path: Path, repo_root: Path) -> list[str]:
    sets = {"paths.raw": tmp_path / "raw", "paths.dedup": tmp_path / "dedup",
            "paths.metrics": tmp_path / "metrics", "paths.models": tmp_path / "models",
            "tracking.enabled": "false", "dedup.remove_near": "true", "dedup.crop_grid": 3,
            "dedup.overlap_threshold": 8}  # the real-data settings (params.yaml: synthetic)
    args = ["--params", str(repo_root / "params.yaml")]
    for key, value in sets.items():
        args += ["-S", f"{key}={value}"]
    return args


def test_dedup_stage_end_to_end(tmp_path, repo_root):
    build_raw(tmp_path / "raw")
    metrics = dedup_main(_args(tmp_path, repo_root))
    clean = pd.read_parquet(tmp_path / "dedup" / "manifest.parquet").set_index("key")
    assert len(clean) == 16 and "t12" not in clean.index  # ok rows only
    assert (clean.loc["t10", "dup_of"], clean.loc["t10", "dup_kind"]) == ("t00", "exact")
    assert (clean.loc["t11", "dup_of"], clean.loc["t11", "dup_kind"]) == ("t01", "near")
    assert (clean.loc["v03", "dup_of"], clean.loc["v03", "dup_kind"]) == ("v02", "exact")
    assert clean["dup_of"].isna().sum() == 13
    assert pd.isna(clean.loc["v00", "dup_of"])  # val is never removed for resembling train
    overlap = pd.read_parquet(tmp_path / "dedup" / "overlap.parquet").set_index("val_key")
    assert sorted(overlap.index) == ["v00", "v01", "v02"]
    assert overlap.loc["v00", "overlap"] and overlap.loc["v00", "train_key"] == "t02"
    assert not overlap.loc["v01", "overlap"] and overlap.loc["v01", "distance"] > 8
    saved = json.loads((tmp_path / "metrics" / "dedup.json").read_text())
    assert saved == metrics
    assert (saved["removed_exact"], saved["removed_near"], saved["val_overlap"]) == (2, 1, 1)
    assert saved["overlap_rate"] == pytest.approx(1 / 3)


def test_exact_only_keeps_near_copies(tmp_path, repo_root):
    build_raw(tmp_path / "raw")
    metrics = dedup_main(_args(tmp_path, repo_root) + ["-S", "dedup.remove_near=false"])
    clean = pd.read_parquet(tmp_path / "dedup" / "manifest.parquet").set_index("key")
    assert pd.isna(clean.loc["t11", "dup_of"]) and clean.loc["t10", "dup_kind"] == "exact"
    assert (metrics["removed_exact"], metrics["removed_near"]) == (2, 0)


def test_dedup_without_collect_is_one_line(tmp_path, repo_root, capsys):
    with pytest.raises(SystemExit) as info:
        dedup_main(_args(tmp_path, repo_root))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 1 and err[-1].startswith("error: ") and "run the collect" in err[-1]
    assert len([e for e in err if e.startswith("error")]) == 1


def test_embeddings_without_model_is_one_line(tmp_path, repo_root, capsys):
    build_raw(tmp_path / "raw")
    with pytest.raises(SystemExit) as info:
        dedup_main(_args(tmp_path, repo_root) + ["-S", "dedup.use_embeddings=true"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert info.value.code == 1 and len(err) == 1 and "clip.safetensors" in err[0]
    assert not (tmp_path / "dedup" / "manifest.parquet").exists()


def test_overlap_by_contrastive_embeddings(tmp_path, repo_root):
    """dedup.use_embeddings: the reranker's image embeddings (paper §3.2), a tiny untrained one."""
    from dalle.config import load_params
    from dalle.io import save_checkpoint
    from dalle.models import clip
    from dalle.models.config import from_section

    params = load_params(repo_root / "params.yaml")
    config = from_section(clip.ClipConfig, params.clip, image_size=64,
                          vocab_size=params.tokenizer.vocab_size, text_len=params.tokenizer.text_len)
    model = clip.ContrastiveModel(config)
    (tmp_path / "models").mkdir()
    save_checkpoint(tmp_path / "models" / "clip.safetensors", model.state_dict(),
                    clip.clip_config_dict(model))
    build_raw(tmp_path / "raw")
    metrics = dedup_main(_args(tmp_path, repo_root) + ["-S", "dedup.use_embeddings=true"])
    overlap = pd.read_parquet(tmp_path / "dedup" / "overlap.parquet").set_index("val_key")
    assert set(overlap["method"]) == {"cosine"} and metrics["overlap_method"] == "cosine"
    assert overlap.loc["v00", "train_key"] == "t02"  # its JPEG copy is the closest train image
    assert overlap["distance"].between(-1e-6, 2.0).all()
