"""A small CLIP-style contrastive model: the reranker of paper §2.6 and the embedder of §3.2.

Image encoder: a strided conv net at data.image_size whose final feature map is flattened (not
pooled), so that positions ("a red circle above a blue square") survive into the embedding.
Text encoder: a pre-norm transformer over the project's BPE tokens (pad = -1), read out at the
last real token as in CLIP. Both project to `embed_dim` and are L2-normalised; the loss is the
symmetric InfoNCE of CLIP with a learned temperature (logit scale clamped at 100).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dalle.errors import CheckpointError
from dalle.io import load_checkpoint
from dalle.models.config import as_dict, check_weights, from_dict

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


@dataclass(frozen=True)
class ClipConfig:
    """Everything that builds a `ContrastiveModel`; stored in its checkpoint."""

    embed_dim: int
    image_width: int
    text_width: int
    text_layers: int
    text_heads: int
    temperature_init: float  # CLIP: 0.07 (only the initial logit scale)
    image_size: int
    vocab_size: int  # BPE ids the text encoder reads
    text_len: int

    def __post_init__(self) -> None:
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads "
                             f"{self.text_heads}")


class ImageEncoder(nn.Module):
    """uint8-derived float [B, 3, S, S] in [0, 1] -> [B, embed_dim]."""

    def __init__(self, image_size: int, width: int, embed_dim: int) -> None:
        super().__init__()
        patch = max(1, image_size // 16)  # patchify stem (ViT/ConvNeXt): S/patch = 16 cells
        side, ch = -(-image_size // patch), width
        layers: list[nn.Module] = [nn.Conv2d(3, width, patch, stride=patch), nn.GroupNorm(8, width),
                                   nn.GELU()]
        while side > 4:  # halve until a 4x4 map (positions kept on a coarse grid)
            nxt = min(ch * 2, width * 8)
            layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.GroupNorm(8, nxt), nn.GELU(),
                       nn.Conv2d(nxt, nxt, 3, padding=1), nn.GroupNorm(8, nxt), nn.GELU()]
            side, ch = (side + 1) // 2, nxt
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(ch * side * side, embed_dim)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body((x - self.mean) / 0.25)  # [B, C, s, s]
        return self.proj(h.flatten(1))  # [B, D]


class TextEncoder(nn.Module):
    """token ids [B, T] (pad -1) + lengths [B] -> [B, embed_dim]."""

    def __init__(self, vocab_size: int, text_len: int, width: int, layers: int, heads: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size + 1, width)  # last row: padding
        self.pos = nn.Parameter(torch.randn(text_len, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.pad_id = vocab_size

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = max(1, int(lengths.max()))  # trailing all-pad columns carry nothing
        ids = ids[:, :T]
        ids = torch.where(ids < 0, torch.full_like(ids, self.pad_id), ids)  # [B, T]
        h = self.tok(ids) + self.pos[:T]  # [B, T, W]
        pad = torch.arange(T, device=ids.device)[None] >= lengths[:, None]  # [B, T]
        h = self.ln(self.blocks(h, src_key_padding_mask=pad))
        last = (lengths - 1).clamp(min=0)  # CLIP reads the text out at its last token
        return self.proj(h[torch.arange(len(ids)), last])  # [B, D]


class ContrastiveModel(nn.Module):
    """Paper §2.6: a contrastive image-text model that scores (caption, image) pairs."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = c = config
        self.image_size = c.image_size
        self.visual = ImageEncoder(c.image_size, c.image_width, c.embed_dim)
        self.text = TextEncoder(c.vocab_size, c.text_len, c.text_width, c.text_layers,
                                c.text_heads, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.temperature_init)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in [0, 1] -> normalised [B, D]."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                   mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, lengths), dim=-1)  # [B, D]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): cross-entropy over the rows and columns of scale * I T^T."""
    logits = scale * img @ txt.t()  # [B, B]
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def load_clip(path: str | Path) -> ContrastiveModel:
    """The one loader of a contrastive-model checkpoint (written by train_clip; its stored
    `ClipConfig` validated) -> eval-mode ContrastiveModel without gradients."""
    weights, stored, _ = load_checkpoint(path)
    config = from_dict(ClipConfig, stored, str(path))
    check_weights(ContrastiveModel, config, weights, str(path))
    model = ContrastiveModel(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} does not match the contrastive-model config: {first}") from None
    return model.eval().requires_grad_(False)


def clip_config_dict(model: ContrastiveModel) -> dict[str, Any]:
    """What a contrastive-model checkpoint stores as its config."""
    return as_dict(model.config)
