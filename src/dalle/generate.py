"""The `generate` stage: N candidates per evaluation caption, reranked, top k kept (paper §2.6).

For each evaluation caption (the first `generate.n_captions` of every combo kind in
the evaluation captions) the prior draws N = `generate.candidates` image-token grids (paper: 512,
t = 1), the dVAE decodes them, the contrastive model scores them and the best `generate.keep`
are written as PNGs. The candidates file keeps every candidate's tokens and score so that
evaluate can rebuild best-of-n for any n <= N without resampling (paper fig. 9c).

The randomness is per caption: the candidates of the i-th caption of a combo kind are drawn from
uniforms of a generator seeded by (seed, kind, i) (`caption_uniforms`), so a chunk of captions can
be sampled anywhere. Under Horovod the chunks (`generate.batch_size // candidates` captions each,
the batches one process samples) are split over the ranks (chunk c on rank c % world) and rank 0
gathers them and writes exactly the files one process writes.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Generate, Params, Rerank
from dalle.data.reader import eval_captions
from dalle.data.tokenizer import BPETokenizer, load_tokenizer, tokenize
from dalle.distributed.gather import all_gather, my_share
from dalle.distributed.launch import rank_and_world
from dalle.errors import CheckpointError, DataError
from dalle.io import atomic_dir, write_json
from dalle.models.dvae import DiscreteVAE, load_dvae
from dalle.models.transformer import DalleTransformer, load_prior
from dalle.pixels import grid, to_uint8
from dalle.rerank import Reranker, load_reranker, top_k
from dalle.sample import sample_image_tokens
from dalle.stage import Out, StageSpec
from dalle.train import precision_choice

log = logging.getLogger(__name__)
SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # ids, lengths, uniforms -> [B*N, G]
Chunk = tuple[np.ndarray, np.ndarray, list[np.ndarray]]  # tokens [b, N, G], scores [b, N], kept [k, H, W, 3] x b


@dataclass
class Sampler:
    """The three trained pieces sampling needs, loaded by their one loaders and checked against
    each other (the stage, `dalle generate` and evaluation all take them from here)."""

    prior: DalleTransformer
    dvae: DiscreteVAE
    tokenizer: BPETokenizer


def check_compatible(prior: DalleTransformer, dvae: DiscreteVAE, tokenizer: BPETokenizer,
                     where: Path) -> None:
    """One line naming the first disagreement between the prior and the dVAE / tokenizer."""
    c, d = prior.config, dvae.config
    if tokenizer.vocab_size > c.text_vocab:
        raise CheckpointError(f"{where} reads {c.text_vocab} text tokens but the tokenizer has "
                              f"{tokenizer.vocab_size}; retrain the prior (dvc repro train_prior)")
    if (c.image_vocab, c.grid) != (d.vocab_size, d.grid):
        raise CheckpointError(f"{where} was trained on a {c.grid}x{c.grid} grid of {c.image_vocab} "
                              f"codes but the dVAE makes {d.grid}x{d.grid} of {d.vocab_size}; "
                              "retrain the prior (dvc repro train_prior)")


def load_sampler(art: Artefacts, prior_path: Optional[Path] = None) -> Sampler:
    """The prior (at `prior_path`, default the pipeline's), dVAE and tokenizer, checked."""
    path = prior_path or art.prior
    prior, dvae = load_prior(path), load_dvae(art.dvae)
    tokenizer = load_tokenizer(art.tokenizer, dropout=0.0)
    check_compatible(prior, dvae, tokenizer, path)
    return Sampler(prior, dvae, tokenizer)


def select_captions(frame: pd.DataFrame, per_combo: int) -> pd.DataFrame:
    """The first `per_combo` captions of every combo kind ("seen", "holdout", "val")."""
    if frame.empty:
        raise DataError("the evaluation caption list is empty (rerun the collect stage)")
    picked = frame.groupby("combo", sort=False, group_keys=False).head(per_combo)
    return picked.reset_index(drop=True)


def caption_uniforms(seed: int, combo: str, index: int, candidates: int, positions: int
                     ) -> torch.Tensor:
    """The uniforms [N, G] the N candidates of the index-th caption of a combo kind are drawn
    from: a generator seeded by (seed, kind, index), whatever the rank or batch."""
    key = hashlib.sha256(f"{seed}:{combo}:{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.rand(candidates, positions, generator=gen)


def _chunk(captions: pd.DataFrame, s: int, e: int, uniforms: torch.Tensor, ids: torch.Tensor,
           lengths: torch.Tensor, cfg: Generate, sample: SampleFn,
           decode: Callable[[torch.Tensor], torch.Tensor], reranker: Reranker) -> Chunk:
    """Captions s..e: -> tokens [b, N, G], scores [b, N], kept images [k, H, W, 3] per caption."""
    toks = sample(ids[s:e], lengths[s:e], uniforms.flatten(0, 1)).long()  # [b*N, G], caption-major
    images = to_uint8(decode(toks))  # [b*N, H, W, 3]
    texts = np.repeat(captions["caption"].to_numpy()[s:e], cfg.candidates).tolist()
    sc = reranker.score(texts, images).reshape(e - s, cfg.candidates)  # [b, N]
    best = top_k(sc, cfg.keep)  # [b, k]
    images = images.reshape(e - s, cfg.candidates, *images.shape[1:])
    kept = [images[i, best[i]] for i in range(e - s)]
    return toks.view(e - s, cfg.candidates, -1).numpy().astype(np.uint16), sc, kept


def run_candidates(captions: pd.DataFrame, ids: torch.Tensor, lengths: torch.Tensor, cfg: Generate,
                   sample: SampleFn, decode: Callable[[torch.Tensor], torch.Tensor],
                   reranker: Reranker, seed: int, positions: int
                   ) -> Optional[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """-> tokens [C, N, G], scores [C, N], kept uint8 images per caption [k, H, W, 3] on rank 0
    (None on the other ranks): this rank's chunks of captions, gathered in caption order."""
    per_chunk = max(1, cfg.batch_size // cfg.candidates)
    index = captions.groupby("combo", sort=False).cumcount().to_numpy()  # i-th caption of its kind
    starts = list(range(0, len(captions), per_chunk))
    rank, world = rank_and_world()
    if rank == 0:
        log.info("%d captions in %d chunks over %d rank(s)", len(captions), len(starts), world)
    mine: dict[int, Chunk] = {}
    bar = tqdm(total=len(captions), desc="generate", unit="caption", disable=rank != 0)
    for c in my_share(range(len(starts))):
        s, e = starts[c], min(starts[c] + per_chunk, len(captions))
        uniforms = torch.stack([caption_uniforms(seed, str(captions["combo"].iat[i]), int(index[i]),
                                                 cfg.candidates, positions) for i in range(s, e)])
        mine[c] = _chunk(captions, s, e, uniforms, ids, lengths, cfg, sample, decode, reranker)
        bar.update(e - s)
    bar.close()
    gathered = all_gather(mine)
    if rank != 0:
        return None
    chunks = [part[c] for c in range(len(starts)) for part in gathered if c in part]
    return (np.concatenate([t for t, _, _ in chunks]),
            np.concatenate([sc for _, sc, _ in chunks]).astype(np.float32),
            [im for _, _, kept in chunks for im in kept])


def write_samples(out: Path, art: Artefacts, captions: pd.DataFrame, tokens: np.ndarray,
                  scores: np.ndarray, kept: list[np.ndarray], keep: int) -> pd.DataFrame:
    """PNGs, grids, the index and the candidates into `out` (the samples directory to be)."""
    rows = []
    order = top_k(scores, keep)
    for c, row in enumerate(captions.itertuples(index=False)):
        (out / "grids").mkdir(parents=True, exist_ok=True)
        grid(kept[c], cols=len(kept[c]), gap=2).save(out / "grids" / f"{row.caption_id}.png")
        for rank, cand in enumerate(order[c]):
            rel = f"images/{row.caption_id}_r{rank}.png"
            (out / "images").mkdir(exist_ok=True)
            Image.fromarray(kept[c][rank]).save(out / rel)
            rows.append({"caption_id": row.caption_id, "caption": row.caption, "combo": row.combo,
                         "candidate": int(cand), "score": float(scores[c, cand]), "rank": rank,
                         "path": rel})
    index = pd.DataFrame(rows)
    index.to_parquet(out / art.samples_index.name, index=False)
    np.savez_compressed(out / art.candidates.name, tokens=tokens, scores=scores,
                        caption_ids=captions["caption_id"].to_numpy().astype(str),
                        captions=captions["caption"].to_numpy().astype(str),
                        combos=captions["combo"].to_numpy().astype(str))
    return index


def generate(art: Artefacts, tracker: Any, generate: Generate, rerank: Rerank, seed: int
             ) -> dict[str, Any]:
    """The `generate` stage body (every rank samples its chunks; rank 0 writes)."""
    cfg = generate
    captions = select_captions(eval_captions(art), cfg.n_captions)
    models = load_sampler(art)
    reranker = load_reranker(rerank, art)
    ids, lengths = tokenize(models.tokenizer, captions["caption"].tolist(), models.prior.text_len)
    choice = precision_choice.for_sampling(cfg.precision, models.prior, ids[:1], lengths[:1],
                                           min(cfg.batch_size, cfg.candidates), sample_image_tokens)
    choice = all_gather(choice)[0]  # every rank samples in rank 0's precision (auto times this machine)

    def sample(i: torch.Tensor, n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return sample_image_tokens(models.prior, i, n, cfg.candidates, cfg.temperature, cfg.top_k,
                                   cfg.top_p, cfg.batch_size, precision=choice.precision, uniforms=u)

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = run_candidates(captions, ids, lengths, cfg, sample, models.dvae.decode, reranker,
                             seed, models.prior.grid ** 2)
    seconds = time.perf_counter() - t0
    if out is None:  # a rank other than 0: its chunks went to rank 0
        return {"captions": len(captions), "seconds": round(seconds, 1)}
    tokens, scores, kept = out
    with atomic_dir(art.samples) as tmp:
        index = write_samples(tmp, art, captions, tokens, scores, kept, cfg.keep)
    metrics = {"captions": len(captions), "candidates": cfg.candidates, "keep": cfg.keep,
               "images_sampled": int(tokens.shape[0] * tokens.shape[1]),
               "seconds": round(seconds, 1), "reranker": reranker.name, "precision": choice.precision,
               "score_best_mean": round(float(scores.max(1).mean()), 4),
               "score_mean": round(float(scores.mean()), 4)}
    write_json(art.metrics("generate"), metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    for png in sorted((art.samples / "grids").glob("*.png"))[:8]:
        tracker.log_artifact(png, "grids")
    return {**metrics, "kept_images": len(index)}


def preflight(params: Params) -> None:
    """No caption to sample is one error line, before any launch on several ranks."""
    select_captions(eval_captions(Artefacts(params.paths)), params.generate.n_captions)


STAGE = StageSpec(
    name="generate", fn=generate, params=("generate", "rerank", "seed"),
    inputs=lambda a: (a.prior, a.dvae, a.clip, a.tokenizer, a.eval_captions),
    outputs=lambda a: (Out(a.samples), Out(a.metrics("generate"), metric=True)),
    summary="N candidates per evaluation caption, reranked, the top k kept (§2.6); split by "
            "caption chunk over distributed.num_proc Horovod ranks when asked (the same files)",
    distributed=True, preflight=preflight,
)
