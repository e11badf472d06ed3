"""`dalle generate "caption" -o out.png`: sample images from the trained prior (paper §2.6, §3.3)."""
from __future__ import annotations

import argparse
import logging
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dalle.catalog import Artefacts
from dalle.commands.config_cmd import add_params_args
from dalle.config import load_params
from dalle.data.tokenizer import UNK, BPETokenizer
from dalle.errors import ConfigError, DataError
from dalle.generate import load_sampler
from dalle.models.dvae import DiscreteVAE
from dalle.pixels import grid, save_png, to_uint8
from dalle.rerank import cli_rerank_fn
from dalle.runs import fetch_model
from dalle.sample import sample_image_tokens

log = logging.getLogger(__name__)
RerankFn = Callable[[list[str], torch.Tensor], torch.Tensor]  # (captions, images [B,3,H,W]) -> order


def identity_rerank(captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """Default: candidates in sampling order (the reranking engineer plugs CLIP in here, §2.6)."""
    return torch.arange(images.shape[0])


def encode_prompt(tokenizer: BPETokenizer, prompt: str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [1, T] (pad -1), lengths [1]; empty / unknown-only prompts are one-line errors."""
    if not prompt.strip():
        raise ConfigError("the prompt is empty; pass a caption, e.g. dalle generate \"a red circle\"")
    ids = tokenizer.encode([prompt])[0]
    unk = tokenizer._det.token_to_id(UNK)
    if not ids or (unk is not None and unk in ids):
        raise ConfigError(f"the prompt {prompt!r} contains characters the tokenizer does not know "
                          "(it was trained on the captions of this dataset)")
    if len(ids) > text_len:
        log.warning("prompt is %d tokens; truncated to text_len %d", len(ids), text_len)
    return tokenizer.encode_padded([prompt], text_len)


def prime_tokens(path: str, rows: int, dvae: DiscreteVAE) -> torch.Tensor:
    """The first `rows` grid rows of an image's dVAE tokens (paper §3.3), [1, rows * grid]."""
    size, side = dvae.config.image_size, dvae.config.grid
    try:
        with Image.open(path) as im:
            img = np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read prime image {path}: {exc}") from None
    if img.shape[:2] != (size, size):
        raise DataError(f"prime image {path} is {img.shape[1]}x{img.shape[0]}, expected {size}x{size}")
    if not 0 < rows < side:
        raise ConfigError(f"--prime-rows {rows} must be between 1 and {side - 1} (grid is {side})")
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W]
    return dvae.encode(x)[:, :rows * side]


def _default_rerank(params, art: Artefacts) -> RerankFn:
    """The configured contrastive reranker (paper §2.6) when one exists, else sampling order."""
    if not (art.clip.is_file() or params.rerank.clip_checkpoint):
        log.warning("no reranker (%s); keeping candidates in sampling order", art.clip)
        return identity_rerank
    return cli_rerank_fn(params.rerank, art)


def generate(args: argparse.Namespace, rerank_fn: RerankFn = identity_rerank) -> int:
    if args.candidates < 1 or not 0 < (args.keep or args.candidates) <= args.candidates:
        raise ConfigError(f"--keep {args.keep} must be between 1 and --candidates {args.candidates}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ConfigError(f"need --temperature > 0 (got {args.temperature}), 0 < --top-p <= 1 "
                          f"(got {args.top_p}), --top-k >= 0 (got {args.top_k})")
    params = load_params(args.params, args.preset, args.overrides)
    art = Artefacts(params.paths)
    prior_path = None
    if args.model:  # models:/dalle-prior@good, runs:/ID/model or a local dir/file
        fetched = fetch_model(args.model)
        prior_path = fetched / art.prior.name if fetched.is_dir() else fetched
    models = load_sampler(art, prior_path)
    ids, lengths = encode_prompt(models.tokenizer, args.prompt, models.prior.text_len)
    prime = prime_tokens(args.prime, args.prime_rows, models.dvae) if args.prime else None
    gen = torch.Generator().manual_seed(args.seed)
    tokens = sample_image_tokens(models.prior, ids, lengths, args.candidates, args.temperature, args.top_k,
                                 args.top_p, args.batch_size, gen, prime_tokens=prime, progress=True)
    images = models.dvae.decode(tokens).float()  # [N, 3, H, W]
    if rerank_fn is identity_rerank:
        rerank_fn = _default_rerank(params, art)
    pick = rerank_fn([args.prompt] * len(images), images)[: args.keep or args.candidates]
    save_png(grid(to_uint8(images[pick]), cols=min(len(pick), 8)), args.output)
    print(f"wrote {args.output} ({len(pick)} of {args.candidates} candidates)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample images for a caption from models/prior + dvae")
    p.add_argument("prompt", help="the caption")
    p.add_argument("-o", "--output", required=True, help="PNG grid to write")
    p.add_argument("--candidates", type=int, default=8, help="images to sample (paper: 512)")
    p.add_argument("--keep", type=int, default=None, help="how many to keep (default: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--prime", default=None, help="image whose top rows prime the sample (paper §3.3)")
    p.add_argument("--prime-rows", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, metavar="URI",
                   help="prior from the MLflow registry (models:/dalle-prior@good) or a path")
    add_params_args(p)
    p.set_defaults(func=lambda a: generate(a))
