"""Token caching, the `encode` stage (paper §2.2): images -> dVAE codes, captions -> BPE ids.

The EMA encoder is run with argmax (no gumbel noise) over the clean train/val splits, so prior
training never touches pixels. Output per split (`Artefacts.tokens(split)`): image_tokens uint16
[N, grid^2], text_tokens int32 [N, text_len] (pad -1), text_lengths int32 [N], keys, captions.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dalle.catalog import SPLITS, Artefacts
from dalle.config_sections import Encode
from dalle.data.reader import load_split
from dalle.data.tokenizer import BPETokenizer, load_tokenizer
from dalle.errors import DataError
from dalle.io import atomic_path
from dalle.models.dvae import DiscreteVAE, load_dvae
from dalle.pixels import as_rgb_uint8, to_float
from dalle.stage import Out, StageSpec

log = logging.getLogger("dalle.encode")


@torch.inference_mode()  # ~10% over no_grad here: no version counters / autograd metadata
def encode_images(model: DiscreteVAE, images: np.ndarray, batch_size: int,
                  desc: str = "encode") -> np.ndarray:
    """uint8 [N, H, W, 3] -> image tokens uint16 [N, grid^2] (argmax codes, paper §2.2)."""
    if model.vocab_size > 65536:
        raise DataError(f"dvae.vocab_size {model.vocab_size} does not fit uint16 tokens")
    fmt = torch.channels_last
    model.to(memory_format=fmt)
    out = np.empty((len(images), 0), dtype=np.uint16)
    chunks = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        x = to_float(torch.from_numpy(images[i:i + batch_size]), fmt)  # [B, 3, H, W]
        chunks.append(model.encode(x).to(torch.int32).numpy().astype(np.uint16))  # [B, grid^2]
    return np.concatenate(chunks) if chunks else out


def write_tokens(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez must not append ".npz" to tmp
            np.savez(fh, **arrays)
    return path


def encode_split(model: DiscreteVAE, tokenizer: BPETokenizer, text_len: int, keys: list[str],
                 captions: list[str], images: np.ndarray, batch_size: int,
                 split: str) -> dict[str, np.ndarray]:
    images = as_rgb_uint8(images, model.config.image_size, split)
    image_tokens = encode_images(model, images, batch_size, desc=f"encode {split}")
    ids, lengths = tokenizer.encode_padded(list(captions), text_len)  # [N, T] pad -1, [N]
    return {"image_tokens": image_tokens, "text_tokens": np.asarray(ids, dtype=np.int32),
            "text_lengths": np.asarray(lengths, dtype=np.int32),
            "keys": np.asarray(keys, dtype=str), "captions": np.asarray(captions, dtype=str)}


def encode_tokens(art: Artefacts, tracker: Any, encode: Encode, text_len: int) -> dict[str, Any]:
    """Library function of the `encode` stage; returns its metrics."""
    cfg = encode
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_dvae(art.dvae)
    tokenizer = load_tokenizer(art.tokenizer)
    metrics: dict[str, Any] = {}
    for split in SPLITS:
        data = load_split(art, split)
        if split == "train" and len(data) == 0:
            raise DataError(f"the train split under {art.clean} is empty; nothing to encode")
        t0 = time.perf_counter()
        arrays = encode_split(model, tokenizer, text_len, data.keys, data.captions, data.images,
                              cfg.batch_size, split)
        seconds = time.perf_counter() - t0
        write_tokens(art.tokens(split), arrays)
        metrics[f"{split}_n"] = len(data)
        metrics[f"{split}_images_per_s"] = len(data) / max(seconds, 1e-9)
    metrics["grid"] = int(arrays["image_tokens"].shape[1]) if len(arrays["image_tokens"]) else 0
    tracker.log_metrics(metrics)
    return metrics


STAGE = StageSpec(
    name="encode", fn=encode_tokens, params=("encode", "tokenizer.text_len"),
    inputs=lambda a: (a.dvae, a.tokenizer, a.clean, a.raw),
    outputs=lambda a: (Out(a.tokens_dir),),
    summary="argmax image tokens + BPE text into the token cache (§2.2)",
)
