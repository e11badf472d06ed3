"""Attention masks and the masked self-attention of the prior (paper §2.2, App. B.1, fig. 11).

One attention operation covers the whole stream [text (T) | image (N = grid²)] (paper fn. 7):
text -> text causal, image -> text full, text -> image never, image -> image causal within the
layer's sparse pattern. Mask convention: True = may attend (as `scaled_dot_product_attention`).

Image -> image patterns for image queries i and keys j in raster order, w = grid width:
* row:           i - w <= j <= i   (extent w + 1: the last key is the same column one row up)
* column:        j <= i and j = i (mod w)
* convolutional: j <= i, |col_i - col_j| <= k//2, row_i - k//2 <= row_j <= row_i  (k = 11 paper)
* full:          j <= i            (dense comparison option)
Layer i (1-based) of n (App. B.1): the last layer is convolutional; otherwise column when
(i - 2) mod 4 == 0, else row -> layers 1..4 are row, column, row, row.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("row", "column", "conv", "full")


def layer_kinds(n_layers: int, attention: str = "sparse") -> list[str]:
    """The image -> image pattern of every layer (paper App. B.1)."""
    if attention == "full":
        return ["full"] * n_layers
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]
    kinds[-1] = "conv"
    return kinds


def image_mask(kind: str, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """Bool [N, N] image -> image mask of one pattern (True = attend)."""
    n = grid * grid
    i = torch.arange(n).view(n, 1)  # queries
    j = torch.arange(n).view(1, n)  # keys
    causal = j <= i
    if kind == "full":
        return causal
    if kind == "row":
        return causal & (j >= i - grid)
    if kind == "column":
        return causal & ((i - j) % grid == 0)
    if kind == "conv":
        half = conv_kernel // 2
        ri, ci, rj, cj = i // grid, i % grid, j // grid, j % grid
        return causal & ((ci - cj).abs() <= half) & (rj >= ri - half) & (rj <= ri)
    raise ValueError(f"unknown attention pattern {kind!r}; expected one of {KINDS}")


def stream_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """Bool [T+N, T+N] mask over the whole stream (paper fn. 7)."""
    n = grid * grid
    mask = torch.zeros(text_len + n, text_len + n, dtype=torch.bool)
    mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool).tril()  # text causal
    mask[text_len:, :text_len] = True  # image -> text: full
    mask[text_len:, text_len:] = image_mask(kind, grid, conv_kernel)
    return mask


class SelfAttention(nn.Module):
    """Multi-head attention with an explicit mask; `step` decodes one position from a KV cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head)  # [B, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, Dh]
        return q, k, v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, h, t, dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * dh))  # [B, T, D]

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x [B, T, D], mask bool [T, T]; fills cache[:, :, :T] with this prefix's keys/values."""
        q, k, v = self._heads(x)
        if cache is not None:
            t = x.shape[1]
            cache[0][:, :, :t].copy_(k)
            cache[1][:, :, :t].copy_(v)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, T, Dh]
        return self._merge(y)

    def step(self, x: torch.Tensor, pos: int, cache: tuple[torch.Tensor, torch.Tensor],
             keys: torch.Tensor) -> torch.Tensor:
        """x [B, 1, D] at stream position `pos`; attends the cached keys `keys` (the allowed
        entries of the mask row of pos, so sparse rows stay cheap)."""
        q, k, v = self._heads(x)  # [B, H, 1, Dh]
        cache[0][:, :, pos:pos + 1].copy_(k)
        cache[1][:, :, pos:pos + 1].copy_(v)
        kk = cache[0].index_select(2, keys)  # [B, H, K, Dh]
        vv = cache[1].index_select(2, keys)
        att = (q @ kk.transpose(-1, -2)) / math.sqrt(self.d_head)  # [B, H, 1, K]
        y = att.softmax(-1) @ vv  # [B, H, 1, Dh]
        return self._merge(y)
