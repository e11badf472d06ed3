"""A small CLIP-style contrastive model: the reranker of paper §2.6 and the embedder of §3.2.

Image encoder: a strided conv net at data.image_size whose final feature map is flattened (not
pooled), so that positions ("a red circle above a blue square") survive into the embedding.
Text encoder: a pre-norm transformer over the project's BPE tokens (pad = -1), read out at the
last real token as in CLIP. Both project to `embed_dim` and are L2-normalised; the loss is the
symmetric InfoNCE of CLIP with a learned temperature (logit scale clamped at 100).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalle.errors import CheckpointError, DataError

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


def model_config(cfg: Any, image_size: int, vocab_size: int, text_len: int) -> dict[str, Any]:
    """The architecture keys of a `Clip` section that a checkpoint must agree on."""
    keys = ("embed_dim", "image_width", "text_width", "text_layers", "text_heads")
    out = {k: int(getattr(cfg, k)) for k in keys}
    out.update(image_size=int(image_size), vocab_size=int(vocab_size), text_len=int(text_len))
    return out


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

    def __init__(self, config: Mapping[str, Any], temperature_init: float = 0.07) -> None:
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.image_size = int(c["image_size"])
        self.visual = ImageEncoder(c["image_size"], c["image_width"], c["embed_dim"])
        self.text = TextEncoder(c["vocab_size"], c["text_len"], c["text_width"], c["text_layers"],
                                c["text_heads"], c["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))

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


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"expected uint8 images [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(255.0)


def load_clip(path: str | Path, expected: Mapping[str, Any] | None = None) -> ContrastiveModel:
    """`models/clip.safetensors` (written by train_clip) -> eval-mode ContrastiveModel."""
    from dalle.io import load_checkpoint

    weights, config, _ = load_checkpoint(path, expected_config=expected)
    required = ("embed_dim", "image_width", "text_width", "text_layers", "text_heads",
                "image_size", "vocab_size", "text_len")
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"{path} is not a contrastive-model checkpoint (config lacks {missing[0]})")
    model = ContrastiveModel(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} does not match the contrastive-model config: {first}") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def embed_images(model: ContrastiveModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [N, H, W, 3] -> normalised float32 [N, D], batched."""
    out = [model.encode_image(uint8_to_float(images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.config["embed_dim"]), np.float32)


def image_embeddings(checkpoint: str | Path, images: np.ndarray) -> np.ndarray:
    """Paper §3.2 hook for dedup: normalised image embeddings [N, D] from the trained reranker."""
    return embed_images(load_clip(checkpoint), images)
