"""Contrastive reranking (paper §2.6): score (caption, image) pairs and keep the best candidates.

Two scorers share one interface, `Reranker.score(captions, images) -> float [B]` (cosine
similarity of the normalised embeddings):
* ours: the contrastive model of the train_clip stage, over the project's BPE tokens;
* a real OpenAI/open_clip checkpoint at `rerank.clip_checkpoint` (a local path; nothing is
  downloaded), loaded by open_clip's own loader, `open_clip.create_model_and_transforms`: a
  directory is `local-dir:` (its `open_clip_config.json` gives the architecture and the
  `preprocess_cfg`, its weights file the weights); a file is the weights of `rerank.clip_arch`.
  Images go through the model's own validation transform (its size, interpolation, crop, mean and
  std from `preprocess_cfg`), so any open_clip checkpoint reranks with its own preprocessing.
(The design put reranking in sample.py; it lives here, see docs/decisions.md.)
"""
from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.catalog import Artefacts
from dalle.config_sections import Rerank
from dalle.data.tokenizer import load_tokenizer, tokenize
from dalle.errors import CheckpointError, DataError
from dalle.models.clip import load_clip
from dalle.pixels import to_float, to_uint8

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


def ours(art: Artefacts, device: str | torch.device = "cpu") -> Reranker:
    """The reranker trained by train_clip, computing on `device` (embeddings come back on CPU)."""
    model = load_clip(art.clip).to(device)
    tokenizer = load_tokenizer(art.tokenizer)
    text_len = model.config.text_len

    def image(x: torch.Tensor) -> torch.Tensor:
        return model.encode_image(x.to(device)).cpu()

    def text(captions: Sequence[str]) -> torch.Tensor:
        ids, lengths = tokenize(tokenizer, list(captions), text_len)
        return model.encode_text(ids.to(device), lengths.to(device)).cpu()

    return Reranker(image, text, name="dalle-clip")


def _source(cfg: Rerank) -> tuple[str, Optional[str]]:
    """(model name, pretrained file) for open_clip: `local-dir:<dir>` for a directory holding
    open_clip_config.json and weights, else the built-in `rerank.clip_arch` with the file."""
    import open_clip

    path = Path(cfg.clip_checkpoint or "")
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise CheckpointError(f"rerank.clip_checkpoint {path} is a directory without "
                                  "open_clip_config.json (open_clip's local-dir layout)")
        if not any(any(path.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
            raise CheckpointError(f"rerank.clip_checkpoint {path} holds no weights file "
                                  "(*.safetensors, *.bin or *.pth)")  # open_clip would init randomly
        return f"local-dir:{path}", None
    if not path.is_file():
        raise CheckpointError(f"rerank.clip_checkpoint {path} does not exist")
    if cfg.clip_arch not in open_clip.list_models():
        raise CheckpointError(f"rerank.clip_arch {cfg.clip_arch!r} is not an open_clip architecture")
    return cfg.clip_arch, str(path)


def open_clip_model(cfg: Rerank, device: str = "cpu") -> tuple[Any, Any, Callable[[Any], torch.Tensor]]:
    """(model, tokenizer, validation transform: PIL image -> [3, S, S]) of a local OpenAI/open_clip
    checkpoint, through open_clip's own loader (strict loading of the weights)."""
    import open_clip

    name, pretrained = _source(cfg)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                     device=device, weights_only=True)
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as exc:
        first = " ".join(str(exc).split())[:200]
        if "state_dict" in first or "size mismatch" in first or "Missing key" in first:
            raise CheckpointError(f"rerank.clip_checkpoint {cfg.clip_checkpoint} does not fit "
                                  f"{name!r}: {first}") from None
        raise CheckpointError(f"rerank.clip_checkpoint {cfg.clip_checkpoint} cannot be read as "
                              f"{name!r} weights ({first})") from None
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name), preprocess


def from_open_clip(cfg: Rerank, device: str = "cpu") -> Reranker:
    model, tokenizer, preprocess = open_clip_model(cfg, device)

    def image(x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> the model's own preprocessing -> normalised [B, D]."""
        batch = torch.stack([preprocess(Image.fromarray(a)) for a in to_uint8(x)])  # [B, 3, S, S]
        return F.normalize(model.encode_image(batch.to(device)), dim=-1).cpu()

    def text(captions: Sequence[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(tokenizer(list(captions)).to(device)), dim=-1).cpu()

    path = Path(cfg.clip_checkpoint or "")
    return Reranker(image, text, name=f"open_clip:{path.name if path.is_dir() else cfg.clip_arch}")


def load_reranker(cfg: Rerank, art: Artefacts, device: str | torch.device = "cpu") -> Reranker:
    """`rerank.clip_checkpoint` when set (real CLIP weights), else our trained model."""
    return from_open_clip(cfg, str(device)) if cfg.clip_checkpoint else ours(art, device)


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
