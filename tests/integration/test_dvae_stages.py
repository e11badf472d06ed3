"""`stages.train_dvae` then `stages.encode` on a tiny synthetic world in a tmp dir."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle.catalog import Artefacts
from dalle.config import load_params
from dalle.data.reader import load_split
from dalle.models.dvae import load_dvae
from tests.helpers import stage_main
collect_main = stage_main("collect")
dedup_main = stage_main("dedup")
prepare_main = stage_main("prepare")
encode_main = stage_main("encode")
tokenizer_main = stage_main("tokenizer")
train_dvae_main = stage_main("train_dvae")

TINY = {"data.synthetic.n_images": 48, "data.image_size": 16, "data.shard_size": 24,
        "tokenizer.vocab_size": 300, "tokenizer.text_len": 24,
        "dvae.vocab_size": 32, "dvae.n_hid": 8, "dvae.dec_n_hid": 8, "dvae.n_init": 8,
        "dvae.group_count": 3, "dvae.n_blk_per_group": 1, "dvae.steps": 3, "dvae.batch_size": 8,
        "dvae.log_every": 1, "dvae.checkpoint_every": 2, "encode.batch_size": 16}


def _args(tmp: Path, repo_root: Path, extra: dict | None = None) -> list[str]:
    sets = {"paths.raw": tmp / "raw", "paths.dedup": tmp / "dedup", "paths.clean": tmp / "clean",
            "paths.tokens": tmp / "tokens",
            "paths.metrics": tmp / "metrics", "paths.models": tmp / "models",
            "paths.plots": tmp / "plots", "tracking.enabled": "false", **TINY, **(extra or {})}
    args = ["--params", str(repo_root / "params.yaml")]
    for key, value in sets.items():
        args += ["-S", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def world(tmp_path_factory, repo_root=Path(__file__).resolve().parents[2]):  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("dvae_world")
    for main in (collect_main, dedup_main, prepare_main, tokenizer_main):
        main(_args(tmp, repo_root))
    return tmp, repo_root


def test_train_dvae_then_encode(world):
    tmp, repo_root = world
    metrics = train_dvae_main(_args(tmp, repo_root))
    assert (tmp / "models" / "dvae.safetensors").exists() and (tmp / "plots" / "dvae_recon.png").exists()
    on_disk = json.loads((tmp / "metrics" / "dvae.json").read_text())
    assert on_disk["val_recon_mse"] == pytest.approx(metrics["val_recon_mse"])
    attrs = [on_disk[f"oracle_recon_{k}"] for k in ("count", "colour", "shape", "size", "position")]
    assert all(0.0 <= a <= 1.0 for a in attrs) and on_disk["oracle_all_correct_recon"] <= min(attrs)
    assert json.loads((tmp / "models" / "dvae.json").read_text())["image_size"] == 16
    encode_main(_args(tmp, repo_root))
    model = load_dvae(tmp / "models" / "dvae.safetensors")
    files = sorted((tmp / "tokens").iterdir())
    assert [f.name for f in files] == [f"{s}-{i:05d}.npz" for s in ("train", "val") for i in (0, 1)]
    for path in files:  # one token file per clean shard
        with np.load(path) as npz:
            tokens, text = npz["image_tokens"], npz["text_tokens"]
            assert tokens.dtype == np.uint16 and tokens.shape[1] == 16  # 4x4 grid
            assert tokens.max() < 32 and text.dtype == np.int32 and text.shape[1] == 24
            assert npz["text_lengths"].dtype == np.int32 and len(npz["keys"]) == len(tokens)
            assert (text[0, npz["text_lengths"][0]:] == -1).all()
            assert len(npz["captions"]) == len(tokens)
    val = load_split(Artefacts(load_params(repo_root / "params.yaml", overrides=[
        f"paths.clean={tmp / 'clean'}"]).paths), "val")
    x = torch.from_numpy(val.images[:4]).permute(0, 3, 1, 2).float() / 255
    with np.load(tmp / "tokens" / "val-00000.npz") as npz:
        assert list(npz["keys"][:4]) == val.keys[:4]
        assert np.array_equal(model.encode(x).numpy(), npz["image_tokens"][:4].astype(np.int64))


def test_encode_resumes_only_with_the_same_dvae(world):
    """A token file this dVAE + tokenizer wrote is kept by a rerun (a run killed part-way goes
    on from there); a new dVAE re-encodes everything."""
    tmp, repo_root = world
    if not (tmp / "tokens").is_dir():
        train_dvae_main(_args(tmp, repo_root))
        encode_main(_args(tmp, repo_root))
    first = {p.name: p.stat().st_mtime_ns for p in (tmp / "tokens").iterdir()}
    (tmp / "tokens" / "val-00001.npz").unlink()  # as if killed before the last shard
    metrics = encode_main(_args(tmp, repo_root))
    again = {p.name: p.stat().st_mtime_ns for p in (tmp / "tokens").iterdir()}
    assert [k for k in first if again[k] != first[k]] == ["val-00001.npz"]
    assert metrics["train_n"] + metrics["val_n"] == 48  # the kept shards counted too
    train_dvae_main(_args(tmp, repo_root, {"seed": 1}))  # another dVAE: nothing can be reused
    encode_main(_args(tmp, repo_root))
    assert all(p.stat().st_mtime_ns != again[p.name] for p in (tmp / "tokens").iterdir())


def _one_line_error(capsys, fn, argv) -> str:  # noqa: ANN001
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    return err[0]


def test_encode_without_dvae_is_one_line(world, tmp_path, capsys):
    tmp, repo_root = world
    line = _one_line_error(capsys, encode_main,
                           _args(tmp, repo_root, {"paths.models": tmp_path / "empty"}))
    assert "checkpoint not found" in line


def test_encode_with_dvae_of_other_architecture_is_one_line(world, tmp_path, capsys):
    tmp, repo_root = world
    (tmp_path / "dvae.safetensors").write_bytes(b"\x80\x04garbage pickle")
    line = _one_line_error(capsys, encode_main, _args(tmp, repo_root, {"paths.models": tmp_path}))
    assert "pickle" in line


def test_bad_dvae_param_is_one_line(world, capsys):
    tmp, repo_root = world
    line = _one_line_error(capsys, train_dvae_main, _args(tmp, repo_root, {"dvae.group_count": 0}))
    assert "dvae.group_count" in line
