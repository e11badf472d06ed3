"""The `evaluate` stage: FID/IS vs blur radius and vs rerank size, oracle accuracy (paper §3.1-3.2).

* Fig. 9(a): FID/IS of the best-of-N samples vs the clean val images, both blurred with a
  Gaussian of radius 0, 1, 2, 4, 8.
* Fig. 9(c): FID/IS of best-of-n (chosen among the first n candidates) for n = 1, 2, 4, ..., N,
  rebuilt from the generate stage's candidates without resampling.
* Everything against all val images ("all", the paper's solid lines) and against val minus the
  images dedup found overlapping train ("no_overlap", the dashed lines); and the best-of-n samples
  of the seen and of the held-out captions each against all val images ("all_seen",
  "all_holdout", in the rerank rows).
* Synthetic world: the oracle's per-attribute and all-correct accuracy of best-of-n, per combo
  kind ("seen" / "holdout"), as a function of n. Real drawings (`data.source: openmoji`): the
  model-free skin-tone check (`dalle.eval.skin_tone`) of best-of-n, per combo kind, in the same
  rows (its `all_correct` is `skin_tone`); which check applies is read from each caption's spec.
  Beside it, the same check on the val drawings those captions name, as drawn and as the dVAE
  reconstructs them (`dalle.eval.ceiling`): the most the samples can reach through these codes.

Under Horovod the independent jobs (one FID/IS per rerank size or blur radius and reference set,
one oracle scoring per rerank size) are split over the ranks (job j on rank j % world); rank 0
gathers the rows in job order and alone writes the metrics and plots and logs to MLflow.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dalle.catalog import Artefacts, png
from dalle.config_sections import Evaluate, Loader, Params, Rerank
from dalle.data.reader import eval_captions
from dalle.distributed.gather import all_gather, my_share
from dalle.distributed.launch import rank_and_world
from dalle.errors import DataError
from dalle.eval import fid as F
from dalle.eval.ceiling import skin_tone_ceiling
from dalle.eval.checks import check
from dalle.eval.oracle import ATTRIBUTES
from dalle.eval.plots import line_png, write_plot_json
from dalle.eval.reference import RealImages, reference_sets
from dalle.eval.sample_sheet import write_sample_sheet
from dalle.io import write_json
from dalle.models.dvae import DiscreteVAE, load_dvae
from dalle.pixels import to_uint8
from dalle.rerank import load_reranker
from dalle.stage import Out, StageSpec
from dalle.train.common import resolve_device

log = logging.getLogger(__name__)


def require_candidates(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing; run the generate stage first (dvc repro generate)")
    return path


def load_candidates(path: Path) -> dict[str, np.ndarray]:
    require_candidates(path)
    with np.load(path, allow_pickle=False) as npz:
        out = {k: npz[k] for k in npz.files}
    if out["scores"].ndim != 2 or out["scores"].shape[0] == 0:
        raise DataError(f"{path} holds no candidates (scores shape {out['scores'].shape})")
    return out


def best_of(scores: np.ndarray, n: int) -> np.ndarray:
    """Paper fig. 9(c): index of the best-scored candidate among the first n -> [C]."""
    return scores[:, :n].argmax(axis=1)


@torch.inference_mode()
def decode(dvae: DiscreteVAE, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
    """image tokens [C, G] -> uint8 [C, H, W, 3]."""
    t = torch.from_numpy(tokens.astype(np.int64))
    return np.concatenate([to_uint8(dvae.decode(t[i:i + batch])) for i in range(0, len(t), batch)])


def extractor(cfg: Evaluate, rerank_cfg: Rerank, art: Artefacts,
              class_captions: list[str]) -> F.Extractor:
    """Inception-v3 from evaluate.inception_weights, else the contrastive image encoder."""
    if cfg.inception_weights:
        return F.inception_extractor(cfg.inception_weights)
    reranker = load_reranker(rerank_cfg, art, resolve_device(cfg.device))
    with torch.no_grad():
        classes = reranker.encode_text(class_captions)  # [K, D]
    source = Path(rerank_cfg.clip_checkpoint or art.clip)
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    return F.clip_extractor(reranker.encode_image, classes, reranker.name, digest)


def oracle_rows(images: np.ndarray, specs: list[Optional[str]], combos: np.ndarray, n: int
                ) -> list[dict[str, Any]]:
    """Per combo kind: mean correctness of each attribute the check reads, for best-of-n images."""
    rows = []
    results = [check(s, img) for s, img in zip(specs, images)]
    for combo in sorted(set(combos.tolist())):
        got = [r for r, c in zip(results, combos) if c == combo and r is not None]
        if got:
            keys = ("skin_tone", "skin_found", "all_correct") if "skin_tone" in got[0] else (
                *ATTRIBUTES, "all_correct")
            rows.append({"rerank_size": n, "combo": combo, "n": len(got),
                         **{a: round(float(np.mean([r[a] for r in got])), 4) for a in keys}})
    return rows


def specs_by_id(frame: pd.DataFrame) -> dict[str, str]:
    """caption_id -> spec (JSON) of the evaluation captions that have one (a val caption's is
    null: pd.NA in the parquet's string column); {} without a spec column."""
    if "spec" not in frame.columns:
        return {}
    return {i: s for i, s in zip(frame["caption_id"].astype(str), frame["spec"]) if isinstance(s, str)}


Job = tuple[str, int, float, str]  # kind ("rerank", "blur", "oracle"), rerank size, radius, reference
Rows = list[dict[str, Any]]


def sweep_jobs(cfg: Evaluate, sizes: list[int], refs: list[str], combos: tuple[str, ...] = ()
               ) -> list[Job]:
    """Every independent piece of the sweeps, in the order one process runs them; `combos`: the
    caption kinds whose best-of-n samples also get their own FID/IS against all val images."""
    jobs = [("rerank", n, 0.0, ref) for n in sizes for ref in refs]
    jobs += [("combo", n, 0.0, combo) for n in sizes for combo in combos]
    jobs += [("blur", sizes[-1], float(r), ref) for r in cfg.blur_radii for ref in refs]
    return jobs + [("oracle", n, 0.0, "") for n in sizes]


def combo_kinds(combos: np.ndarray) -> tuple[str, ...]:
    """The seen / held-out caption kinds with at least 2 captions (FID needs 2 images)."""
    kinds, counts = np.unique(combos.astype(str), return_counts=True)
    return tuple(k for k, c in zip(kinds.tolist(), counts) if k in ("seen", "holdout") and c >= 2)


def sweeps(cand: dict[str, np.ndarray], dvae: DiscreteVAE, refs: dict[str, RealImages], ext: F.Extractor,
           cfg: Evaluate, specs: list[Optional[str]]) -> Optional[tuple[Rows, Rows, Rows]]:
    """(blur rows, rerank rows, oracle rows) on rank 0, None on the other ranks: each rank runs
    its share of the jobs, decoding only the best-of-n sets those need."""
    scores, n_max = cand["scores"], cand["scores"].shape[1]
    sizes = sorted({n for n in cfg.rerank_sizes if n <= n_max} | {n_max})
    jobs = sweep_jobs(cfg, sizes, list(refs), combo_kinds(cand["combos"]))
    images: dict[int, np.ndarray] = {}  # rerank size -> best-of-n uint8 [C, H, W, 3]
    rank, world = rank_and_world()
    if rank == 0:
        log.info("%d FID/IS and oracle jobs over %d rank(s)", len(jobs), world)
    mine: dict[int, Rows] = {}
    for j in tqdm(my_share(range(len(jobs))), desc="evaluate: FID/IS", unit="set", disable=rank != 0):
        kind, n, radius, ref = jobs[j]
        if n not in images:
            images[n] = decode(dvae, cand["tokens"][np.arange(len(scores)), best_of(scores, n)])
        if kind == "oracle":
            mine[j] = oracle_rows(images[n], specs, cand["combos"], n)
        elif kind == "combo":  # ref is the caption kind; its samples against all val images
            part = images[n][cand["combos"].astype(str) == ref]
            mine[j] = [{"rerank_size": n, **F.fidelity(part, refs["all"], 0.0, ext, "all", cfg.cache_dir,
                                                       cfg.batch_size, resolve_device(cfg.device)),
                        "reference": f"all_{ref}"}]
        else:
            mine[j] = [{"rerank_size": n, **F.fidelity(images[n], refs[ref], radius, ext, ref, cfg.cache_dir,
                                                      cfg.batch_size, resolve_device(cfg.device))}]
    gathered = all_gather(mine)
    if rank != 0:
        return None
    rows = {j: r for part in gathered for j, r in part.items()}
    blur, rerank, oracle = ([r for j, job in enumerate(jobs) if job[0] in kinds for r in rows[j]]
                            for kinds in (("blur",), ("rerank", "combo"), ("oracle",)))
    return blur, rerank, oracle


def evaluate(art: Artefacts, tracker: Any, evaluate: Evaluate, rerank: Rerank, loader: Loader
             ) -> dict[str, Any]:
    """The `evaluate` stage body: metrics, plot data, PNGs to the tracker (rank 0 writes)."""
    cfg = evaluate
    t0 = time.perf_counter()
    cand = load_candidates(art.candidates)
    if len(cand["captions"]) == 0:
        raise DataError(f"{art.candidates} has an empty caption list")
    refs, skipped = usable(reference_sets(art, loader.max_bad_fraction, loader.in_memory_max_mb))
    ext = extractor(cfg, rerank, art, sorted(set(cand["captions"].tolist())))
    dvae = load_dvae(art.dvae)
    captions = eval_captions(art)  # caption_id, caption, combo, spec: read once
    specs = specs_by_id(captions)
    rows = sweeps(cand, dvae, refs, ext, cfg, [specs.get(str(c)) for c in cand["caption_ids"]])
    if rows is None:  # a rank other than 0: its rows went to rank 0
        return {"seconds": round(time.perf_counter() - t0, 1)}
    blur, rerank_rows, oracle = rows
    metrics = summarise(blur, rerank_rows, oracle, ext, cand["scores"].shape[1])
    metrics.update({f"reference_{name}_skipped": why for name, why in skipped.items()})
    metrics.update(skin_tone_ceiling(art, dvae, captions, loader.max_bad_fraction))
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_outputs(art, tracker, blur, rerank_rows, oracle, metrics, specs)
    return metrics


def usable(refs: dict[str, RealImages]) -> tuple[dict[str, RealImages], dict[str, str]]:
    """The reference sets FID can use (2 images or more), and why the others were left out: a
    collection whose every val image overlaps train has an empty `no_overlap` set, which is a
    finding to report, not a reason to lose the rest of the evaluation. `all` is never dropped
    (fewer than 2 val images stays the one-line error of fid.check_pair)."""
    kept, skipped = {}, {}
    for name, ref in refs.items():
        if name != "all" and len(ref) < 2:
            skipped[name] = f"{len(ref)} val images left (every other one overlaps train)"
            log.warning("reference set %s skipped: %s", name, skipped[name])
        else:
            kept[name] = ref
    return kept, skipped


def summarise(blur: list, rerank: list, oracle: list, ext: F.Extractor, n_max: int) -> dict[str, Any]:
    out: dict[str, Any] = {"extractor": ext.name, "candidates": n_max}
    for r in rerank:
        if r["rerank_size"] in (1, n_max):
            out[f"fid_{r['reference']}_n{r['rerank_size']}"] = round(r["fid"], 4)
            out[f"is_{r['reference']}_n{r['rerank_size']}"] = round(r["is"], 4)
    for r in blur:
        out[f"fid_{r['reference']}_blur{r['radius']:g}"] = round(r["fid"], 4)
    for r in oracle:
        if r["rerank_size"] in (1, n_max):
            name = "skin_tone" if "skin_tone" in r else "oracle_all_correct"
            out[f"{name}_{r['combo']}_n{r['rerank_size']}"] = r["all_correct"]
    return out


def write_outputs(art: Artefacts, tracker: Any, blur: list, rerank: list, oracle: list,
                  metrics: dict[str, Any], specs: dict[str, str]) -> None:
    write_plot_json(art.fid_blur, blur)
    write_plot_json(art.fid_rerank, rerank)
    write_plot_json(art.oracle_rerank, oracle)
    write_json(art.metrics("eval"), metrics)
    ys = ["all_correct", "skin_found"] if any("skin_tone" in r for r in oracle) else [
        "all_correct", "colour", "shape", "position"]
    pngs = [line_png(png(art.fid_blur), blur, "radius", ["fid", "is"], "reference",
                     f"FID/IS vs blur radius (fig. 9a; {metrics['extractor']})"),
            line_png(png(art.fid_rerank), rerank, "rerank_size", ["fid", "is"], "reference",
                     f"FID/IS vs rerank size (fig. 9c; {metrics['extractor']})", logx=True),
            line_png(png(art.oracle_rerank), oracle, "rerank_size", ys, "combo",  # empty: no specs
                     "model-free check (oracle / skin tone) vs rerank size", logx=True)]
    sheet = write_sample_sheet(art.sample_sheet, pd.read_parquet(art.samples_index), specs,
                               art.samples, metrics["candidates"])
    for picture in [*pngs, *([sheet] if sheet else [])]:
        tracker.log_artifact(picture, "plots")
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def preflight(params: Params) -> None:
    """No candidates is one error line, before any launch on several ranks."""
    require_candidates(Artefacts(params.paths).candidates)


STAGE = StageSpec(
    name="evaluate", fn=evaluate, params=("evaluate", "rerank", "loader"),
    inputs=lambda a: (a.samples, a.dvae, a.clip, a.tokenizer, a.clean, a.overlap),
    outputs=lambda a: (*(Out(f(p), cache=False) for p in (a.fid_blur, a.fid_rerank, a.oracle_rerank)
                         for f in (Path, png)),
                       Out(a.sample_sheet, cache=False), Out(a.metrics("eval"), metric=True)),
    summary="FID/IS over blur radii and rerank sizes, with and without the val images that overlap "
            "training; oracle accuracy on seen vs held-out combinations (§3.1); its jobs split over "
            "distributed.num_proc Horovod ranks when asked (the same outputs)",
    distributed=True, preflight=preflight,
)
