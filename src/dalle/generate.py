"""The `generate` stage: N candidates per evaluation caption, reranked, top k kept (paper §2.6).

For each evaluation caption (the first `generate.n_captions` of every combo kind in
eval_captions.parquet) the prior draws N = `generate.candidates` image-token grids (paper: 512,
t = 1), the dVAE decodes them, the contrastive model scores them and the best `generate.keep`
are written as PNGs. `samples/candidates.npz` keeps every candidate's tokens and score so that
evaluate can rebuild best-of-n for any n <= N without resampling (paper fig. 9c).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from dalle.config_sections import Generate, Paths, Rerank, Tokenizer
from dalle.errors import CheckpointError, DataError
from dalle.io import atomic_dir, load_checkpoint, write_json
from dalle.rerank import Reranker, load_reranker, top_k

SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ids, lengths -> [B*N, G]


def select_captions(frame: pd.DataFrame, per_combo: int) -> pd.DataFrame:
    """The first `per_combo` captions of every combo kind ("seen", "holdout", "val")."""
    if frame.empty:
        raise DataError("the evaluation caption list is empty (data/raw/eval_captions.parquet)")
    picked = frame.groupby("combo", sort=False, group_keys=False).head(per_combo)
    return picked.reset_index(drop=True)


def load_prior(paths: Paths) -> torch.nn.Module:
    from dalle.models.transformer import from_config

    path = Path(paths.models) / "prior.safetensors"
    weights, config, _ = load_checkpoint(path)
    model = from_config(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its own config ({str(exc)[:120]})") from None
    return model.eval()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_image(images: np.ndarray) -> Image.Image:
    """uint8 [k, H, W, 3] -> one row of k images with 2-px white gaps."""
    k, h, w, _ = images.shape
    canvas = np.full((h, k * (w + 2) - 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        canvas[:, i * (w + 2):i * (w + 2) + w] = img
    return Image.fromarray(canvas)


def run_candidates(captions: pd.DataFrame, ids: torch.Tensor, lengths: torch.Tensor, cfg: Generate,
                   sample: SampleFn, decode: Callable[[torch.Tensor], torch.Tensor],
                   reranker: Reranker) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """-> tokens [C, N, G], scores [C, N], kept uint8 images per caption [k, H, W, 3]."""
    per_chunk = max(1, cfg.batch_size // cfg.candidates)
    tokens, scores, kept = [], [], []
    bar = tqdm(total=len(captions), desc="generate", unit="caption")
    for s in range(0, len(captions), per_chunk):
        e = min(s + per_chunk, len(captions))
        toks = sample(ids[s:e], lengths[s:e]).long()  # [b*N, G], caption-major
        images = to_uint8(decode(toks))  # [b*N, H, W, 3]
        texts = np.repeat(captions["caption"].to_numpy()[s:e], cfg.candidates).tolist()
        sc = reranker.score(texts, images).reshape(e - s, cfg.candidates)  # [b, N]
        best = top_k(sc, cfg.keep)  # [b, k]
        images = images.reshape(e - s, cfg.candidates, *images.shape[1:])
        kept += [images[i, best[i]] for i in range(e - s)]
        tokens.append(toks.view(e - s, cfg.candidates, -1).numpy().astype(np.uint16))
        scores.append(sc)
        bar.update(e - s)
    bar.close()
    return np.concatenate(tokens), np.concatenate(scores).astype(np.float32), kept


def write_samples(out: Path, captions: pd.DataFrame, tokens: np.ndarray, scores: np.ndarray,
                  kept: list[np.ndarray], keep: int) -> pd.DataFrame:
    """PNGs, grids, index.parquet and candidates.npz into the directory `out`."""
    rows = []
    order = top_k(scores, keep)
    for c, row in enumerate(captions.itertuples(index=False)):
        (out / "grids").mkdir(parents=True, exist_ok=True)
        grid_image(kept[c]).save(out / "grids" / f"{row.caption_id}.png")
        for rank, cand in enumerate(order[c]):
            rel = f"images/{row.caption_id}_r{rank}.png"
            (out / "images").mkdir(exist_ok=True)
            Image.fromarray(kept[c][rank]).save(out / rel)
            rows.append({"caption_id": row.caption_id, "caption": row.caption, "combo": row.combo,
                         "candidate": int(cand), "score": float(scores[c, cand]), "rank": rank,
                         "path": rel})
    index = pd.DataFrame(rows)
    index.to_parquet(out / "index.parquet", index=False)
    np.savez_compressed(out / "candidates.npz", tokens=tokens, scores=scores,
                        caption_ids=captions["caption_id"].to_numpy().astype(str),
                        captions=captions["caption"].to_numpy().astype(str),
                        combos=captions["combo"].to_numpy().astype(str))
    return index


def generate(cfg: Generate, rerank_cfg: Rerank, tok_cfg: Tokenizer, paths: Paths, tracker: Any
             ) -> dict[str, Any]:
    """The `generate` stage body."""
    from dalle.data.reader import eval_captions
    from dalle.models.dvae import load_dvae
    from dalle.sample import sample_image_tokens
    from dalle.train.clip import load_tokenizer, tokenize

    captions = select_captions(eval_captions(paths), cfg.n_captions)
    prior = load_prior(paths)
    dvae = load_dvae(Path(paths.models) / "dvae.safetensors")
    reranker = load_reranker(rerank_cfg, paths, tok_cfg)
    ids, lengths = tokenize(load_tokenizer(paths), captions["caption"].tolist(),
                            int(prior.text_len))
    gen = torch.Generator().manual_seed(cfg.seed)

    def sample(i: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return sample_image_tokens(prior, i, n, cfg.candidates, cfg.temperature, cfg.top_k,
                                   cfg.top_p, cfg.batch_size, gen)

    t0 = time.perf_counter()
    with torch.inference_mode():
        tokens, scores, kept = run_candidates(captions, ids, lengths, cfg, sample, dvae.decode,
                                              reranker)
    seconds = time.perf_counter() - t0
    with atomic_dir(paths.samples) as tmp:
        index = write_samples(tmp, captions, tokens, scores, kept, cfg.keep)
    metrics = {"captions": len(captions), "candidates": cfg.candidates, "keep": cfg.keep,
               "images_sampled": int(tokens.shape[0] * tokens.shape[1]),
               "seconds": round(seconds, 1), "reranker": reranker.name,
               "score_best_mean": round(float(scores.max(1).mean()), 4),
               "score_mean": round(float(scores.mean()), 4)}
    write_json(Path(paths.metrics) / "generate.json", metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    for grid in sorted((Path(paths.samples) / "grids").glob("*.png"))[:8]:
        tracker.log_artifact(grid, "grids")
    return {**metrics, "kept_images": len(index)}
