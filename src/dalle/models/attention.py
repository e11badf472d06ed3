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

Two exact ways to compute a layer: the boolean stream mask fed to the fused SDPA kernel (any
device; it cannot skip masked-out blocks), or `structured_attention` over a `BlockLayout` (CPU
flash kernels on the text block and on per-row / per-column / per-conv-window image blocks, merged
by log-sum-exp), whose cost is n * (T + K) instead of (T + n)².
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Union

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


@dataclass(frozen=True)
class BlockLayout:
    """Structured form of one layer's image -> image pattern, image queries padded to whole rows.

    Image queries are grouped into G blocks of Q queries with K image keys each: row and conv
    layers group by image row r and give it key rows r - a .. r (a = 1 for row, k//2 for conv);
    column layers group by column (causal within it). `mask` [G, Q, K] (None: causal) is read
    off `image_mask` itself, so the block form is the masked attention computed without its
    masked-out blocks.
    """

    kind: str
    text_len: int
    grid: int
    rows: int  # image rows covered (queries zero-padded to rows * grid)
    above: int  # key rows above the query row (row / conv layouts)
    mask: Optional[torch.Tensor]  # bool [G, Q, K], True = attend; None = causal (column)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, R*W, ...] in raster order -> [B*H, G, Q, ...]."""
        b, h = x.shape[:2]
        x = x.reshape(b * h, self.rows, self.grid, *x.shape[3:])
        return x.transpose(1, 2) if self.kind == "column" else x  # column: G = W, Q = R

    def to_flat(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of to_blocks: [B*H, G, Q, ...] -> [B, H, R*W, ...]."""
        x = x.transpose(1, 2) if self.kind == "column" else x
        return x.reshape(batch, -1, self.rows * self.grid, *x.shape[3:])

    def key_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Image keys or values [B, H, R*W, Dh] -> the keys of every block [B*H, G, K, Dh]."""
        if self.kind == "column":
            return self.to_blocks(x)
        b, h, _, dh = x.shape
        padded = F.pad(x, (0, 0, self.above * self.grid, 0)).reshape(b * h, self.rows + self.above, self.grid, dh)
        return torch.cat([padded[:, o:o + self.rows] for o in range(self.above + 1)], 2)  # rows r-a..r

    def fold_keys(self, g: torch.Tensor, batch: int) -> torch.Tensor:
        """Gradient of key_blocks: [B*H, G, K, Dh] -> [B, H, R*W, Dh] (overlapping windows summed)."""
        if self.kind == "column":
            return self.to_flat(g, batch)
        bh, _, _, dh = g.shape
        out = g.new_zeros(bh, self.rows + self.above, self.grid, dh)
        for o, part in enumerate(g.split(self.grid, 2)):  # key row r - a + o of every query row r
            out[:, o:o + self.rows] += part
        return out[:, self.above:].reshape(batch, -1, self.rows * self.grid, dh)


@lru_cache(maxsize=64)
def block_layout(kind: str, text_len: int, grid: int, rows: int, conv_kernel: int, device: str) -> BlockLayout:
    """The cached BlockLayout of `kind` for image queries in the first `rows` rows (App. B.1).

    Padding queries past the real ones only see keys at or before them, so one layout serves
    every prefix length within those rows."""
    if kind not in ("row", "column", "conv"):
        raise ValueError(f"no block layout for attention pattern {kind!r}; expected row, column or conv")
    if kind == "column":  # query (r, c) attends (r', c) for r' <= r: causal within each column
        return BlockLayout(kind, text_len, grid, rows, 0, None)
    full = image_mask(kind, grid, conv_kernel)  # [N, N]
    above = 1 if kind == "row" else min(conv_kernel // 2, max(rows - 1, 0))
    r, c = torch.arange(rows).view(rows, 1, 1), torch.arange(grid).view(1, grid, 1)
    i = r * grid + c  # [R, W, 1] queries
    j = (r - above) * grid + torch.arange((above + 1) * grid).view(1, 1, -1)  # [R, 1, K]: rows r-a..r
    ok = (j >= 0) & full[i, j.clamp(min=0)]  # image_mask is causal: j <= i
    return BlockLayout(kind, text_len, grid, rows, above, ok.to(device))


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """bool [G, Q, K] -> [1, G, Q, K] of 0 / -inf in the query dtype (what the flash kernel takes)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[None]


class _StructuredAttention(torch.autograd.Function):
    """Fused (flash) attention calls per key set, merged exactly by their log-sum-exps.

    Text queries: causal over text keys. Image queries: part 1 against all text keys, part 2 in
    block layout against their block's image keys; out = Σ_p exp(lse_p - lse) o_p. Backward
    runs each part's flash backward with the merged output and log-sum-exp, which gives the
    gradients of the joint softmax, and writes dq / dk / dv in place (no slice-backward fills).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: BlockLayout) -> torch.Tensor:
        t = lay.text_len
        b, n = q.shape[0], q.shape[2] - t
        pad = (0, 0, 0, lay.rows * lay.grid - n)
        qt, kt, vt = q[:, :, :t], k[:, :, :t], v[:, :, :t]  # [B, H, T, Dh]
        qi, ki, vi = (F.pad(z[:, :, t:], pad) for z in (q, k, v))  # [B, H, R*W, Dh]
        q2, k2, v2 = lay.to_blocks(qi).contiguous(), lay.key_blocks(ki), lay.key_blocks(vi)  # [B*H, G, Q|K, Dh]
        mask = _additive(lay.mask, q.dtype)
        o_t, l_t = _FLASH(qt, kt, vt, 0.0, True)  # text -> text causal
        o1, l1 = _FLASH(qi, kt, vt)  # image -> text: full
        o2, l2 = _FLASH(q2, k2, v2, 0.0, mask is None, attn_mask=mask)  # image -> image blocks
        l2 = lay.to_flat(l2, b)  # [B, H, R*W]
        lse = torch.logaddexp(l1, l2)
        acc = torch.promote_types(q.dtype, torch.float32)  # merge in >= fp32 (bf16 under autocast)
        w1, w2 = (l1 - lse).exp()[..., None], (l2 - lse).exp()[..., None]  # [B, H, R*W, 1]
        o_i = (o1.to(acc) * w1 + lay.to_flat(o2, b).to(acc) * w2).to(q.dtype)  # [B, H, R*W, Dh]
        ctx.save_for_backward(qt, kt, vt, o_t, l_t, qi, q2, k2, v2, o_i, lse, mask)
        ctx.t, ctx.n, ctx.lay = t, n, lay
        return torch.cat([o_t, o_i[:, :, :n]], 2)  # [B, H, T+n, Dh]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        qt, kt, vt, o_t, l_t, qi, q2, k2, v2, o_i, lse, mask = ctx.saved_tensors
        t, n, lay = ctx.t, ctx.n, ctx.lay
        b = grad.shape[0]
        g_t = grad[:, :, :t].contiguous()
        g_i = F.pad(grad[:, :, t:], (0, 0, 0, o_i.shape[2] - n))  # [B, H, R*W, Dh]
        dqt, dkt, dvt = _FLASH_BWD(g_t, qt, kt, vt, o_t, l_t, 0.0, True)
        dq1, dk1, dv1 = _FLASH_BWD(g_i, qi, kt, vt, o_i, lse, 0.0, False)
        dq2, dk2, dv2 = _FLASH_BWD(lay.to_blocks(g_i).contiguous(), q2, k2, v2, lay.to_blocks(o_i).contiguous(),
                                   lay.to_blocks(lse).contiguous(), 0.0, mask is None, attn_mask=mask)
        dq = torch.cat([dqt, (dq1 + lay.to_flat(dq2, b))[:, :, :n]], 2)
        dk = torch.cat([dkt + dk1, lay.fold_keys(dk2, b)[:, :, :n]], 2)
        dv = torch.cat([dvt + dv1, lay.fold_keys(dv2, b)[:, :, :n]], 2)
        return dq, dk, dv, None


def structured_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: BlockLayout) -> torch.Tensor:
    """Sparse attention over [text | image] without a [L, L] mask (paper §2.2, fig. 11).

    q, k, v [B, H, T + n, Dh] -> [B, H, T + n, Dh]. Text queries attend the text causally;
    image queries take one softmax over (all T text keys, their block's K image keys), so the
    cost is n * (T + K) instead of the masked kernel's (T + n)².
    """
    if q.shape[2] <= lay.text_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _StructuredAttention.apply(q, k, v, lay)


Pattern = Union[torch.Tensor, BlockLayout]  # what a layer attends with: a bool mask or a block layout


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

    def forward(self, x: torch.Tensor, mask: Pattern, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D], mask bool [T, T] or a BlockLayout (structured, no dropout); fills
        cache [2, B, H, L, Dh][:, :, :, :T] with this prefix's keys/values."""
        q, k, v = self._heads(x)
        if cache is not None:
            t = x.shape[1]
            cache[0][:, :, :t].copy_(k)
            cache[1][:, :, :t].copy_(v)
        if isinstance(mask, BlockLayout):
            return self._merge(structured_attention(q, k, v, mask))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, T, Dh]
        return self._merge(y)

    def step(self, x: torch.Tensor, pos: int, cache: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x [B, 1, D] at stream position `pos`; cache [2, B, H, L, Dh] (keys, values). Attends
        the cached entries `keys` (the allowed positions of the mask row of pos, precomputed),
        gathered with one index_select, so sparse rows stay cheap."""
        b = x.shape[0]
        qkv = self.qkv(x).view(b, 3, self.n_heads, self.d_head)  # [B, 3, H, Dh]
        cache[:, :, :, pos].copy_(qkv[:, 1:].transpose(0, 1))  # [2, B, H, Dh]
        kv = cache.index_select(3, keys)  # [2, B, H, K, Dh]
        y = F.scaled_dot_product_attention(qkv[:, 0, :, None], kv[0], kv[1])  # [B, H, 1, Dh]
        return self.proj(y.reshape(b, 1, -1))  # [B, 1, D]
