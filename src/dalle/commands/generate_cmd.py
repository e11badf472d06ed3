"""`dalle generate "caption" -o out.png`: sample images from the trained prior (paper §2.6, §3.3)."""
from __future__ import annotations

import argparse
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dalle.catalog import Artefacts
from dalle.commands.config_cmd import add_params_args
from dalle.config import load_params
from dalle.data.images import ImageRejected, load_rgb
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


def read_prime(path: str, size: int) -> np.ndarray:
    """The prime image as uint8 [size, size, 3]; its dimensions are checked from the header
    before a single pixel is decoded (a 12000x12000 PNG of 17 kB is refused at once)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise DataError(f"prime image {path} is too large ({str(exc).split('.')[0]})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read prime image {path}: {exc}") from None
    with im:
        if im.size != (size, size):
            raise DataError(f"prime image {path} is {im.size[0]}x{im.size[1]}, expected "
                            f"{size}x{size}")
        try:
            return np.array(load_rgb(im))  # a writable copy: torch.from_numpy warns on read-only
        except ImageRejected as exc:
            raise DataError(f"prime image {path} cannot be decoded ({exc})") from None


def prime_tokens(path: str, rows: int, dvae: DiscreteVAE) -> torch.Tensor:
    """The first `rows` grid rows of an image's dVAE tokens (paper §3.3), [1, rows * grid]."""
    size, side = dvae.config.image_size, dvae.config.grid
    if not 0 < rows < side:
        raise ConfigError(f"--prime-rows {rows} must be between 1 and {side - 1} (grid is {side})")
    img = read_prime(path, size)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W]
    return dvae.encode(x)[:, :rows * side]


def _default_rerank(params, art: Artefacts) -> RerankFn:
    """The configured contrastive reranker (paper §2.6) when one exists, else sampling order."""
    if not (art.clip.is_file() or params.rerank.clip_checkpoint):
        log.warning("no reranker (%s); keeping candidates in sampling order", art.clip)
        return identity_rerank
    return cli_rerank_fn(params.rerank, art)


def check_args(args: argparse.Namespace) -> None:
    """What the argument types cannot check alone; before any work is done."""
    if args.keep is not None and args.keep > args.candidates:
        raise ConfigError(f"--keep {args.keep} must be at most --candidates {args.candidates}")
    if _SURROGATE.search(args.prompt):
        raise ConfigError(f"the prompt {args.prompt!r} is not valid UTF-8 text")
    if args.prime is not None and not Path(args.prime).is_file():
        raise DataError(f"prime image {args.prime} does not exist (--prime)")


def generate(args: argparse.Namespace, rerank_fn: RerankFn = identity_rerank) -> int:
    check_args(args)
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


def number(kind: type, low: float, high: float, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float), finite, in [low, high] ((low, high] when
    `low_open`); argparse names the argument in its one-line error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {_KIND[kind]}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (low_open and value == low) or value > high:
            left, lo, hi = "(" if low_open else "[", kind(low), kind(high)
            raise argparse.ArgumentTypeError(f"{text} is outside {left}{lo}, {hi}]")
        return value

    parse.__name__ = _KIND[kind]  # what argparse prints for a value it cannot convert
    return parse


_KIND = {int: "an integer", float: "a number"}
_SURROGATE = re.compile("[\ud800-\udfff]")  # from bytes of argv that are not UTF-8
MAX_CANDIDATES = 4096  # 8x the paper's 512: every candidate is decoded and held at once
SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample images for a caption from models/prior + dvae")
    p.add_argument("prompt", help="the caption")
    p.add_argument("-o", "--output", required=True, help="PNG grid to write")
    p.add_argument("--candidates", type=number(int, 1, MAX_CANDIDATES), default=8,
                   help="images to sample (paper: 512)")
    p.add_argument("--keep", type=number(int, 1, MAX_CANDIDATES), default=None,
                   help="how many to keep (default: all)")
    p.add_argument("--temperature", type=number(float, 0, 1e6, low_open=True), default=1.0)
    p.add_argument("--top-k", type=number(int, 0, 2 ** 31 - 1), default=0)
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0)
    p.add_argument("--prime", default=None, help="image whose top rows prime the sample (paper §3.3)")
    p.add_argument("--prime-rows", type=number(int, 1, 2 ** 31 - 1), default=2)
    p.add_argument("--batch-size", type=number(int, 1, MAX_CANDIDATES), default=16)
    p.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0)
    p.add_argument("--model", default=None, metavar="URI",
                   help="prior from the MLflow registry (models:/dalle-prior@good) or a path")
    add_params_args(p)
    p.set_defaults(func=lambda a: generate(a))
