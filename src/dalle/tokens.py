"""Token caching, the `encode` stage (paper §2.2): images -> dVAE codes, captions -> BPE ids.

The EMA encoder is run with argmax (no gumbel noise) over the clean train/val splits, so prior
training never touches pixels. The clean shards are encoded one at a time, in the order prepare
wrote them (memory does not grow with the collection), each to its own file
(`Artefacts.tokens(split, shard)`): a process that is one of several Horovod ranks takes every
world-th shard, and the files are the same whatever the number of ranks. A run killed part-way
resumes: a file already written by this dVAE and tokenizer (its `fingerprint`) is kept.
Per shard: image_tokens uint16 [N, grid^2], text_tokens int32 [N, text_len] (pad -1),
text_lengths int32 [N], keys, captions, fingerprint.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from dalle.catalog import SPLITS, Artefacts
from dalle.config_sections import Encode
from dalle.data.reader import SplitIndex, iterate, split_index
from dalle.data.tokenizer import BPETokenizer, load_tokenizer
from dalle.distributed.gather import all_gather, my_share
from dalle.distributed.launch import rank_and_world
from dalle.errors import DataError
from dalle.io import atomic_path
from dalle.memory import trim
from dalle.models.dvae import DiscreteVAE, load_dvae
from dalle.pixels import to_float
from dalle.stage import Out, StageSpec

log = logging.getLogger("dalle.encode")


@torch.inference_mode()  # ~10% over no_grad here: no version counters / autograd metadata
def encode_images(model: DiscreteVAE, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> image tokens uint16 [N, grid^2] (argmax codes, paper §2.2)."""
    if model.vocab_size > 65536:
        raise DataError(f"dvae.vocab_size {model.vocab_size} does not fit uint16 tokens")
    fmt = torch.channels_last
    model.to(memory_format=fmt)
    out = np.empty((len(images), 0), dtype=np.uint16)
    chunks = []
    for i in range(0, len(images), batch_size):
        part = images[i:i + batch_size]
        if len(part) < batch_size:  # one shape for every batch: no new kernels per shard
            part = np.concatenate([part, np.zeros((batch_size - len(part), *part.shape[1:]), part.dtype)])
        x = to_float(torch.from_numpy(part), fmt)  # [B, 3, H, W]
        codes = model.encode(x).to(torch.int32).numpy().astype(np.uint16)  # [B, grid^2]
        chunks.append(codes[:len(images) - i])
    return np.concatenate(chunks) if chunks else out


def write_tokens(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez must not append ".npz" to tmp
            np.savez(fh, **arrays)
    return path


def encode_split(model: DiscreteVAE, tokenizer: BPETokenizer, text_len: int, keys: list[str],
                 captions: list[str], images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """One shard's samples -> its token arrays."""
    if images.shape[1:3] != (model.config.image_size,) * 2:
        raise DataError(f"images are {images.shape[1]}x{images.shape[2]} but the dVAE was trained "
                        f"at {model.config.image_size}; rerun prepare and train_dvae")
    image_tokens = encode_images(model, images, batch_size)
    ids, lengths = tokenizer.encode_padded(list(captions), text_len)  # [N, T] pad -1, [N]
    return {"image_tokens": image_tokens, "text_tokens": np.asarray(ids, dtype=np.int32),
            "text_lengths": np.asarray(lengths, dtype=np.int32),
            "keys": np.asarray(keys, dtype=str), "captions": np.asarray(captions, dtype=str)}


def _encode_shard(index: SplitIndex, s: int, model: DiscreteVAE, tokenizer: BPETokenizer,
                  text_len: int, batch_size: int) -> dict[str, np.ndarray]:
    starts = np.cumsum([0] + [n for _, n in index.shards])
    samples = list(iterate(index, list(range(starts[s], starts[s + 1]))))
    if not samples:
        raise DataError(f"{index.shards[s][0]} has no readable sample; rerun prepare")
    images = np.stack([im for im, _, _ in samples])
    return encode_split(model, tokenizer, text_len, [k for _, _, k in samples],
                        [c for _, c, _ in samples], images, batch_size)


def _fingerprint(art: Artefacts, text_len: int) -> str:
    """What a token file was made from: the dVAE and tokenizer files and the text length."""
    h = hashlib.sha1(f"text_len={text_len};".encode())
    for path in (art.dvae, art.tokenizer):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _done(path: Path, fingerprint: str) -> Optional[int]:
    """The sample count of a token file this very dVAE/tokenizer already wrote, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(len(z["keys"])) if str(z["fingerprint"]) == fingerprint else None
    except (OSError, ValueError, KeyError):
        return None


def jobs(art: Artefacts) -> list[tuple[SplitIndex, int]]:
    """Every clean shard as (its split's index, its position), in the order prepare wrote them:
    raw shard by raw shard, train then val, so a run stopped early holds both splits."""
    indexes = [split_index(art, split) for split in SPLITS]
    todo = [(shard_number(ix, s), k, ix, s) for k, ix in enumerate(indexes) for s in range(len(ix.shards))]
    return [(ix, s) for _, _, ix, s in sorted(todo, key=lambda t: t[:2])]


def encode_tokens(art: Artefacts, tracker: Any, encode: Encode, text_len: int) -> dict[str, Any]:
    """Library function of the `encode` stage; returns its metrics. A shard whose token file
    this dVAE and tokenizer already wrote (a run killed part-way) is not encoded again."""
    cfg = encode
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_dvae(art.dvae)
    tokenizer = load_tokenizer(art.tokenizer)
    fingerprint = _fingerprint(art, text_len)
    rank, _world = rank_and_world()
    counts = {split: [0, 0] for split in SPLITS}  # samples, samples encoded by this run
    t0 = time.perf_counter()
    todo = jobs(art)
    for index, s in tqdm([todo[i] for i in my_share(range(len(todo)))], desc="encode",
                         unit="shard", disable=rank != 0):
        path = art.tokens(index.split, shard_number(index, s))
        n = _done(path, fingerprint)
        if n is None:
            arrays = _encode_shard(index, s, model, tokenizer, text_len, cfg.batch_size)
            write_tokens(path, {**arrays, "fingerprint": np.asarray(fingerprint)})
            n = len(arrays["keys"])
            counts[index.split][1] += n
            trim()  # the shard's buffers go back to the system: RSS stays flat over shards
        counts[index.split][0] += n
    return _merge(all_gather((counts, time.perf_counter() - t0)), tracker, model)


def _merge(per_rank: list[tuple[dict[str, list[int]], float]], tracker: Any,
           model: DiscreteVAE) -> dict[str, Any]:
    """The stage's metrics from every rank's counts and seconds."""
    seconds = max(max(t for _, t in per_rank), 1e-9)
    metrics: dict[str, Any] = {"grid": model.config.grid}
    for split in SPLITS:
        metrics[f"{split}_n"] = sum(c[split][0] for c, _ in per_rank)
    fresh = sum(c[split][1] for c, _ in per_rank for split in SPLITS)
    metrics["images_per_s"] = fresh / seconds  # of the images encoded by this run
    tracker.log_metrics(metrics)
    return metrics


def shard_number(index: SplitIndex, s: int) -> int:
    """The number of the s-th clean shard of a split (its raw shard's), from its file name."""
    return int(index.shards[s][0].stem.rsplit("-", 1)[1])


STAGE = StageSpec(
    name="encode", fn=encode_tokens, params=("encode", "tokenizer.text_len"),
    inputs=lambda a: (a.dvae, a.tokenizer, a.clean),
    outputs=lambda a: (Out(a.tokens_dir), Out(a.metrics("encode"), metric=True)),
    summary="argmax image tokens + BPE text into the token cache (§2.2); split by shard over "
            "distributed.num_proc Horovod ranks when asked (the same files as one process)",
    distributed=True,
)
