"""`stages/collect.py` + `stages/tokenizer.py` on a tiny synthetic world: resume, reader, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.data.reader import eval_captions, load_split
from dalle.data.tokenizer import BPETokenizer
from tests.helpers import stage_main
collect_main = stage_main("collect")
dedup_main = stage_main("dedup")
prepare_main = stage_main("prepare")
tokenizer_main = stage_main("tokenizer")


def _args(tmp_path: Path, repo_root: Path, *extra: str) -> list[str]:
    sets = {"paths.raw": tmp_path / "raw", "paths.clean": tmp_path / "clean",
            "paths.dedup": tmp_path / "dedup",
            "paths.metrics": tmp_path / "metrics", "paths.models": tmp_path / "models",
            "tracking.enabled": "false", "data.synthetic.n_images": 300, "data.shard_size": 150,
            "data.eval_captions": 20, "tokenizer.vocab_size": 128, "tokenizer.min_frequency": 1}
    args = ["--params", str(repo_root / "params.yaml")]
    for key, value in sets.items():
        args += ["-S", f"{key}={value}"]
    for item in extra:
        args += ["-S", item]
    return args


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1
    return err[0]


def test_collect_resume_reader_and_tokenizer(tmp_path, repo_root):
    args = _args(tmp_path, repo_root)
    metrics = collect_main(args)
    raw = tmp_path / "raw"
    assert metrics["rows"] == 300 and metrics["shards_written"] == 2
    assert json.loads((tmp_path / "metrics" / "collect.json").read_text()) == metrics
    first = (raw / "manifest.parquet").read_bytes()
    tar0 = (raw / "00000.tar").stat().st_mtime_ns
    (raw / "00001.parquet").unlink()  # as if killed before shard 1 completed
    again = collect_main(args)
    assert again["shards_written"] == 1 and (raw / "00000.tar").stat().st_mtime_ns == tar0
    assert (raw / "manifest.parquet").read_bytes() == first  # byte-identical after the resume

    dedup_main(args), prepare_main(args)
    paths = Artefacts(load_params(repo_root / "params.yaml", overrides=[
        f"paths.raw={raw}", f"paths.clean={tmp_path / 'clean'}"]).paths)
    train = load_split(paths, "train")
    size = load_params(repo_root / "params.yaml").data.image_size
    manifest = pd.read_parquet(raw / "manifest.parquet")
    assert len(train) == (manifest["split"] == "train").sum() == metrics["train"]
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (size, size, 3)
    assert train.captions[0] == manifest.set_index("key").loc[train.keys[0], "caption"]
    assert set(eval_captions(paths)["combo"]) == {"seen", "holdout"}

    tok_metrics = tokenizer_main(args)
    tok = BPETokenizer.load(tmp_path / "models" / "tokenizer.json")
    assert tok_metrics["vocab_size"] == tok.vocab_size <= 128 and tok_metrics["truncated"] == 0
    ids, lengths = tok.encode_padded(train.captions[:4], 32)
    assert ids.shape == (4, 32) and (lengths > 3).all()
    assert tok.decode(ids[0]) == train.captions[0].lower()


def test_bad_holdout_is_one_line(tmp_path, repo_root, capsys):
    with pytest.raises(SystemExit) as info:
        collect_main(_args(tmp_path, repo_root, "data.synthetic.holdout=[pink circle]"))
    assert info.value.code == 1 and "'pink circle'" in _one_error(capsys)
    assert not (tmp_path / "raw" / "manifest.parquet").exists()


def test_bad_source_is_one_line(tmp_path, repo_root, capsys):
    with pytest.raises(SystemExit) as info:
        collect_main(_args(tmp_path, repo_root, "data.source=flickr"))
    assert info.value.code == 1 and "flickr" in _one_error(capsys)


def test_empty_url_list_is_one_line(tmp_path, repo_root, capsys):
    (tmp_path / "urls.csv").write_text("url,caption\n")
    with pytest.raises(SystemExit) as info:
        collect_main(_args(tmp_path, repo_root, "data.source=url_list",
                           f"data.url_list.path={tmp_path / 'urls.csv'}"))
    assert info.value.code == 1 and _one_error(capsys)


def test_tokenizer_without_prepare_is_one_line(tmp_path, repo_root, capsys):
    with pytest.raises(SystemExit) as info:
        tokenizer_main(_args(tmp_path, repo_root))
    assert info.value.code == 1 and "run the prepare stage" in _one_error(capsys)
