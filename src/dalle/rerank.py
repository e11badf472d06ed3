"""Contrastive reranking (paper §2.6): score (caption, image) pairs and keep the best candidates.

Two scorers share one interface, `Reranker.score(captions, images) -> float [B]` (cosine
similarity of the normalised embeddings):
* ours: the contrastive model of the train_clip stage, over the project's BPE tokens;
* a real OpenAI/open_clip checkpoint at `rerank.clip_checkpoint` (a local path; nothing is
  downloaded): architecture from `open_clip.create_model(rerank.clip_arch, pretrained=None)`,
  weights via safetensors or `torch.load(weights_only=True)`.
(The design put reranking in sample.py; it lives here, see docs/decisions.md.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dalle.catalog import Artefacts
from dalle.config_sections import Rerank
from dalle.data.tokenizer import load_tokenizer, tokenize
from dalle.errors import CheckpointError, DataError
from dalle.models.clip import load_clip
from dalle.pixels import to_float, to_uint8

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Reranker:
    """Embeds images (float [B, 3, H, W] in [0, 1]) and captions; scores pairs."""

    encode_image: Callable[[torch.Tensor], torch.Tensor]  # -> normalised [B, D]
    encode_text: Callable[[Sequence[str]], torch.Tensor]  # -> normalised [B, D]
    name: str
    batch_size: int = 256

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> [N, D]."""
        out = [self.encode_image(to_float(images[i:i + self.batch_size]))
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def score(self, captions: Sequence[str], images: np.ndarray) -> np.ndarray:
        """Paper §2.6: similarity of each caption with its image -> float32 [B]."""
        if len(captions) != len(images):
            raise DataError(f"rerank got {len(captions)} captions for {len(images)} images")
        if len(captions) == 0:
            return np.zeros(0, np.float32)
        unique = list(dict.fromkeys(captions))
        txt = self.encode_text(unique)  # [U, D]
        row = torch.tensor([unique.index(c) for c in captions])
        img = self.image_features(images)  # [B, D]
        return (img * txt[row]).sum(-1).numpy().astype(np.float32)


def ours(art: Artefacts) -> Reranker:
    """The reranker trained by train_clip."""
    model = load_clip(art.clip)
    tokenizer = load_tokenizer(art.tokenizer)
    text_len = model.config.text_len

    def text(captions: Sequence[str]) -> torch.Tensor:
        ids, lengths = tokenize(tokenizer, list(captions), text_len)
        return model.encode_text(ids, lengths)

    return Reranker(model.encode_image, text, name="dalle-clip")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"rerank.clip_checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise CheckpointError(f"rerank.clip_checkpoint {path} cannot be read as weights "
                              f"({' '.join(str(exc).split())[:120]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"rerank.clip_checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def open_clip_model(cfg: Rerank) -> tuple[Any, Any]:
    """(model, tokenizer) of an OpenAI/open_clip checkpoint at a local path."""
    import open_clip

    if cfg.clip_arch not in open_clip.list_models():
        raise CheckpointError(f"rerank.clip_arch {cfg.clip_arch!r} is not an open_clip architecture")
    model = open_clip.create_model(cfg.clip_arch, pretrained=None)
    state = _read_state_dict(Path(cfg.clip_checkpoint or ""))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"rerank.clip_checkpoint {cfg.clip_checkpoint} does not fit "
                              f"rerank.clip_arch {cfg.clip_arch!r}: {first}") from None
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(cfg.clip_arch)


def from_open_clip(cfg: Rerank) -> Reranker:
    model, tokenizer = open_clip_model(cfg)
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)

    def image(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return F.normalize(model.encode_image((x - mean) / std), dim=-1)

    def text(captions: Sequence[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)

    return Reranker(image, text, name=f"open_clip:{cfg.clip_arch}")


def load_reranker(cfg: Rerank, art: Artefacts) -> Reranker:
    """`rerank.clip_checkpoint` when set (real CLIP weights), else our trained model."""
    return from_open_clip(cfg) if cfg.clip_checkpoint else ours(art)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first: [C, N] -> [C, k] (stable on ties)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


def cli_rerank_fn(cfg: Rerank, art: Artefacts) -> Callable[[list[str], torch.Tensor], torch.Tensor]:
    """The `dalle generate` hook: (captions, float images [B, 3, H, W] in [0, 1]) -> candidate
    indices, best first (paper §2.6), with the configured reranker."""
    return functools.partial(order_candidates, load_reranker(cfg, art))


def order_candidates(reranker: Reranker, captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> LongTensor [B] of indices sorted by score, best first."""
    u8 = to_uint8(images)
    return torch.from_numpy(top_k(reranker.score(list(captions), u8)[None], len(u8))[0].copy())
