"""Token data for the prior: the encode stage's npz files, a resumable batch iterator, BPE dropout.

`paths.tokens/{train,val}.npz`: image_tokens uint16 [N, grid²], text_tokens int32 [N, text_len]
(pad -1), text_lengths int32 [N], keys, captions (docs/architecture.md).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from dalle.data.tokenizer import load_tokenizer
from dalle.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class TokenSet:
    image_tokens: torch.Tensor  # [N, grid²] int32 (half of long: 4 bytes a token held)
    text_tokens: torch.Tensor  # [N, T] int32, pad -1
    text_lengths: torch.Tensor  # [N] long
    captions: list[str]

    @property
    def grid(self) -> int:
        return math.isqrt(self.image_tokens.shape[1])

    def __len__(self) -> int:
        return self.image_tokens.shape[0]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("image_tokens", "text_tokens", "text_lengths")}
            arrays["captions"] = z["captions"] if "captions" in z.files else np.zeros(0, str)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} is not a valid tokens npz ({' '.join(str(exc).split())[:120]})") from None
    return arrays


def load_tokens(files: list[Path], text_len: int, what: str) -> TokenSet:
    """Read, check and join the token files of one split (the encode stage writes one per
    clean shard, in order); every problem is one DataError line naming the file."""
    if not files:
        raise DataError(f"no token file for the {what} split (run the encode stage first)")
    parts = []
    for path in files:
        arrays = _read_npz(path)
        img, txt, lens = arrays["image_tokens"], arrays["text_tokens"], arrays["text_lengths"]
        n = img.shape[0]
        if n == 0 or img.ndim != 2 or math.isqrt(img.shape[1]) ** 2 != img.shape[1]:
            raise DataError(f"{path}: image_tokens has shape {img.shape}, expected [N>0, grid²]")
        if txt.shape != (n, text_len) or lens.shape != (n,):
            raise DataError(f"{path}: text_tokens {txt.shape} / text_lengths {lens.shape} do not "
                            f"match [{n}, tokenizer.text_len={text_len}]")
        if parts and img.shape[1] != parts[0]["image_tokens"].shape[1]:
            raise DataError(f"{path}: {img.shape[1]} image tokens per image, not "
                            f"{parts[0]['image_tokens'].shape[1]} as in {files[0]}; rerun encode")
        parts.append(arrays)
    img, txt, lens = (np.concatenate([p[k] for p in parts])
                      for k in ("image_tokens", "text_tokens", "text_lengths"))
    captions = [str(c) for p in parts for c in p["captions"]]
    return TokenSet(torch.from_numpy(img.astype(np.int32)), torch.from_numpy(txt.astype(np.int32)),
                    torch.from_numpy(lens.astype(np.int64)).clamp(0, text_len),
                    captions if len(captions) == len(img) else [])


class BatchIterator:
    """Shuffled epochs from a seed; `position` (epoch, index) is saved so a resumed run continues."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = epoch, index
        self._cached: tuple[int, torch.Tensor] = (-1, torch.zeros(0, dtype=torch.long))

    def _order(self) -> torch.Tensor:
        if self._cached[0] != self.epoch:  # one permutation per epoch, not one per batch
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._cached = (self.epoch, torch.randperm(self.n, generator=g))
        return self._cached[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        idx: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            order = self._order()[self.index:self.index + need]
            idx.append(order)
            need -= order.numel()
            self.index += order.numel()
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(idx)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class CaptionDropout:
    """Re-encodes captions with BPE dropout (paper §2.2 fn. 5: 10%) using dalle.data.tokenizer."""

    def __init__(self, tokenizer_path: Path, text_len: int, rate: float) -> None:
        self.tok = load_tokenizer(tokenizer_path, dropout=rate)
        self.text_len = text_len

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tok.encode_padded(captions, self.text_len, dropout=True)  # [B, T], [B]


def make_caption_dropout(path: Path, data: TokenSet, text_len: int,
                         rate: float = 0.1) -> Optional[CaptionDropout]:
    """BPE dropout when the tokenizer (at `path`) and the captions exist; otherwise the stored
    tokens (logged)."""
    if not data.captions or not path.is_file():
        log.warning("BPE dropout off: %s", "no captions in the tokens npz" if not data.captions else f"{path} missing")
        return None
    return CaptionDropout(path, text_len, rate) if rate > 0 else None


def get_batch(data: TokenSet, idx: torch.Tensor, dropout: Optional[CaptionDropout]) -> tuple[torch.Tensor, ...]:
    """-> text_ids [B, T], text_lengths [B], image_tokens [B, N] for the rows idx."""
    text, lengths = data.text_tokens[idx].long(), data.text_lengths[idx]
    if dropout is not None:
        text, lengths = dropout([data.captions[i] for i in idx.tolist()])
    return text, lengths, data.image_tokens[idx].long()
