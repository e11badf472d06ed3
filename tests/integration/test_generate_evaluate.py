"""train_clip -> generate -> evaluate on a tiny synthetic world (16 px, random dVAE and prior)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
import pandas as pd
import pytest
import torch

from dalle.config import load_params
from dalle.io import save_checkpoint
from tests.helpers import stage_main

SETS = {"data.image_size": 16, "data.synthetic.n_images": 300, "data.shard_size": 150,
        "data.eval_captions": 4, "tokenizer.vocab_size": 128, "dvae.vocab_size": 32,
        "dvae.n_hid": 8, "dvae.dec_n_hid": 8, "dvae.n_init": 8, "dvae.group_count": 3,
        "prior.n_layers": 2, "prior.d_model": 32, "prior.n_heads": 2, "prior.conv_kernel": 3,
        "clip.embed_dim": 16, "clip.image_width": 8, "clip.text_width": 16, "clip.text_layers": 1,
        "clip.text_heads": 2, "clip.steps": 10, "clip.batch_size": 16, "clip.log_every": 5,
        "clip.retrieval_candidates": 4, "generate.n_captions": 3, "generate.candidates": 4,
        "generate.keep": 2, "generate.batch_size": 8, "evaluate.rerank_sizes": "[1,2,4]",
        "evaluate.blur_radii": "[0,2]", "tracking.enabled": "false"}


def _args(root: Path, repo: Path, extra: dict | None = None) -> list[str]:
    sets = {**SETS, **{f"paths.{k}": root / k for k in ("raw", "dedup", "clean", "tokens", "models",
                                                           "samples", "metrics", "plots")},
            "evaluate.cache_dir": root / "cache", **(extra or {})}
    args = ["--params", str(repo / "params.yaml")]
    for key, value in sets.items():
        args += ["-S", f"{key}={value}"]
    return args


def _random_dvae_and_prior(args: list[str]) -> None:
    """Untrained dVAE and prior, written as their stages write them (config in the metadata)."""
    from dalle.catalog import Artefacts
    from dalle.models import dvae as D
    from dalle.models import transformer as T
    from dalle.models.config import from_section
    from dalle.runner import parse_stage_args

    ns = parse_stage_args("x", args)
    p = load_params(ns.params, None, ns.overrides)
    art = Artefacts(p.paths)
    torch.manual_seed(0)
    dvae = D.DiscreteVAE(from_section(D.DVAEConfig, p.dvae, image_size=p.data.image_size))
    save_checkpoint(art.dvae, dvae.state_dict(), D.dvae_config_dict(dvae))
    prior = T.DalleTransformer(from_section(T.PriorConfig, p.prior, text_vocab=p.tokenizer.vocab_size,
                                            text_len=p.tokenizer.text_len, image_vocab=p.dvae.vocab_size,
                                            grid=dvae.config.grid))
    save_checkpoint(art.prior, prior.state_dict(), T.prior_config_dict(prior))


@pytest.fixture(scope="module")
def world(tmp_path_factory, request) -> tuple[Path, Path]:
    repo = Path(request.config.rootpath)
    root = tmp_path_factory.mktemp("world")
    args = _args(root, repo)
    for stage in ("collect", "dedup", "prepare", "tokenizer"):
        stage_main(stage)(args)
    _random_dvae_and_prior(args)
    return root, repo


def test_train_clip_generate_evaluate_end_to_end(world):
    evaluate = stage_main("evaluate")
    generate = stage_main("generate")
    train_clip = stage_main("train_clip")

    root, repo = world
    args = _args(root, repo)
    m = train_clip(args)
    assert (root / "models" / "clip.safetensors").is_file() and 0.0 <= m["retrieval_top1"] <= 1.0
    assert json.loads((root / "metrics" / "clip.json").read_text()) == m
    g = generate(args)
    index = pd.read_parquet(root / "samples" / "index.parquet")
    n_captions = g["captions"]
    assert len(index) == n_captions * 2 and set(index["rank"]) == {0, 1}
    assert set(index.columns) >= {"caption_id", "caption", "combo", "candidate", "score", "rank", "path"}
    cand = np.load(root / "samples" / "candidates.npz")
    assert cand["scores"].shape == (n_captions, 4) and cand["tokens"].shape == (n_captions, 4, 16)
    for row in index.itertuples():  # kept = the best-scored candidates, best first
        assert row.score == pytest.approx(np.sort(cand["scores"][list(cand["caption_ids"]).index(row.caption_id)])[::-1][row.rank])
        assert (root / "samples" / row.path).is_file()
    e = evaluate(args)
    assert e["extractor"] == "dalle-dalle-clip"
    blur = json.loads((root / "plots" / "fid_blur.json").read_text())
    rerank = json.loads((root / "plots" / "fid_rerank.json").read_text())
    oracle = json.loads((root / "plots" / "oracle_rerank.json").read_text())
    assert {(r["radius"], r["reference"]) for r in blur} == {(0, "all"), (2, "all"), (0, "no_overlap"),
                                                            (2, "no_overlap")}
    assert sorted({r["rerank_size"] for r in rerank}) == [1, 2, 4]
    assert all(np.isfinite(r["fid"]) and r["extractor"] == e["extractor"] for r in blur + rerank)
    assert {r["combo"] for r in oracle} == {"seen", "holdout"}
    assert (root / "plots" / "fid_rerank.png").is_file() and (root / "metrics" / "eval.json").is_file()
    sheet = Image.open(root / "plots" / "samples.png")  # captions beside their top samples
    assert sheet.width > 600 and sheet.height > 300


def test_bad_input_is_one_line(world, tmp_path, capsys):
    evaluate = stage_main("evaluate")
    generate = stage_main("generate")

    root, repo = world
    with pytest.raises(SystemExit) as exc:
        evaluate(_args(root, repo, {"paths.samples": tmp_path / "none"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and "candidates.npz is missing" in err[0]
    empty = tmp_path / "clean"  # generate reads the eval captions prepare copied into clean
    empty.mkdir()
    pd.DataFrame({"caption_id": [], "caption": [], "combo": [], "spec": []}).astype("string").to_parquet(
        empty / "eval_captions.parquet")
    with pytest.raises(SystemExit) as exc:
        generate(_args(root, repo, {"paths.clean": empty}))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and "caption list is empty" in err[-1]
