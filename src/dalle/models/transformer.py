"""The sparse transformer prior over [text | image] tokens (paper §2.2, App. B.1).

Stream (paper §2.2): text tokens (text_len, BPE vocab; positions past the caption hold a learned
padding token per position), a learned start-of-image token, then image tokens (grid², dVAE vocab)
with row + column position embeddings. Input is the stream minus its last token; the output at
position p predicts token p + 1, so the start-of-image position predicts the first image token
(the last text position's output predicts the start-of-image token itself and is not scored).
Text outputs score only the text vocabulary and image outputs only the image vocabulary; logits
are computed in fp32 whatever the autocast state (the loss and the softmax read them in 32-bit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle.errors import CheckpointError
from dalle.io import load_checkpoint
from dalle.models.attention import Pattern, SelfAttention, block_layout, layer_kinds, stream_mask
from dalle.models.config import as_dict, check_weights, from_dict

KVCache = list[torch.Tensor]  # per layer: keys and values [2, B, H, L, Dh]
IMPLS = ("auto", "masked", "structured")
# auto: block layouts from these grids up; below, the masked fused kernel was as fast or faster
# (fwd + bwd of one layer, 1 thread, measured in docs/benchmarks.md "Structured sparse attention")
STRUCTURED_MIN_GRID = {"row": 32, "column": 16, "conv": 32}
ATTENTION = ("sparse", "full")


@dataclass(frozen=True)
class PriorConfig:
    """Everything that builds a `DalleTransformer`; stored in its checkpoint (paper App. B.1)."""

    text_vocab: int  # BPE ids the prior can read and predict (tokenizer.vocab_size: an upper bound)
    text_len: int  # text positions (paper §2.2: 256)
    image_vocab: int  # dVAE codes (paper: 8192)
    grid: int  # image tokens per side (paper: 32)
    n_layers: int
    d_model: int
    n_heads: int
    mlp_ratio: int
    attention: str  # sparse (row/column/conv per layer) or full
    conv_kernel: int  # convolutional mask of the last layer (paper fig. 11: 11)
    dropout: float
    checkpointing: bool  # recompute each resblock in the backward pass (paper §2.4)
    attention_impl: str  # masked | structured | auto: how a sparse layer is computed (exact)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION}")
        if self.attention_impl not in IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {IMPLS}")

    @property
    def seq_len(self) -> int:
        return self.text_len + 1 + self.grid * self.grid  # text | start-of-image | image


class BranchScale(Protocol):
    """What training may put on `ResBlock.grad_scale` (paper §2.4): called as
    scale(x, branch, *args) -> x + branch(x, *args) with the branch's gradients in its own scale."""

    def __call__(self, x: torch.Tensor, branch: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor: ...


class ResBlock(nn.Module):
    """Pre-LN resblock: x + attn(ln(x)) then + mlp(ln(.)); one unit for gradient scaling."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model), nn.Dropout(dropout))
        self.grad_scale: Optional[BranchScale] = None  # set from outside by training (§2.4)

    def _branch(self, x: torch.Tensor, mask: Pattern) -> torch.Tensor:
        a = self.attn(self.ln1(x), mask)  # [B, L, D]
        return a + self.mlp(self.ln2(x + a))

    def forward(self, x: torch.Tensor, mask: Pattern) -> torch.Tensor:
        if self.grad_scale is None:
            return x + self._branch(x, mask)
        return self.grad_scale(x, self._branch, mask)

    def prefill(self, x: torch.Tensor, mask: Pattern, cache: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.ln1(x), mask, cache)
        h = x + a
        return h + self.mlp(self.ln2(h))

    def step(self, x: torch.Tensor, pos: int, cache: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        h = x + self.attn.step(self.ln1(x), pos, cache, keys)
        return h + self.mlp(self.ln2(h))


class DalleTransformer(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = c = config
        text_vocab, text_len, image_vocab, grid = c.text_vocab, c.text_len, c.image_vocab, c.grid
        d_model, n_layers = c.d_model, c.n_layers
        self.attention_impl, self.dropout = c.attention_impl, c.dropout
        self.text_vocab, self.text_len, self.image_vocab, self.grid = text_vocab, text_len, image_vocab, grid
        self.image_start = text_len + 1  # stream position of image token 0 (after start-of-image)
        self.kinds = layer_kinds(n_layers, c.attention)
        self.conv_kernel, self.checkpointing = c.conv_kernel, c.checkpointing
        self.text_emb = nn.Embedding(text_vocab + text_len, d_model)  # + one pad token per position
        self.text_pos = nn.Embedding(text_len, d_model)
        self.soi = nn.Embedding(1, d_model)  # the start-of-image token (§2.2), its own position
        self.image_emb = nn.Embedding(image_vocab, d_model)
        self.row_emb, self.col_emb = nn.Embedding(grid, d_model), nn.Embedding(grid, d_model)
        blocks = [ResBlock(d_model, c.n_heads, c.mlp_ratio, c.dropout) for _ in range(n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, text_vocab + image_vocab)  # [text | image] vocabularies
        self._masks: dict[tuple[str, str], torch.Tensor] = {}
        self._keys: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.apply(self._init)
        for block in blocks:  # GPT-2 style: residual projections scaled by depth
            for lin in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layers))  # type: ignore[arg-type]

    @property
    def resblocks(self) -> list[ResBlock]:
        return list(self.blocks)  # type: ignore[arg-type]

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def mask(self, kind: str, device: torch.device) -> torch.Tensor:
        """Bool [T+N, T+N] stream mask of one pattern, cached per device (not in the state dict)."""
        key = (kind, str(device))
        if key not in self._masks:
            # the start-of-image position is the last "text" position of the mask: causal among
            # the text before it, attended by every image position
            self._masks[key] = stream_mask(kind, self.image_start, self.grid, self.conv_kernel).to(device)
        return self._masks[key]

    def structured(self, kind: str, device: torch.device) -> bool:
        """Whether `kind` layers run the block layout (exact; skips masked-out blocks, CPU kernels)
        rather than the boolean-masked fused kernel: `attention_impl`; auto = STRUCTURED_MIN_GRID."""
        if kind == "full" or device.type != "cpu" or (self.training and self.dropout > 0):
            return False
        return self.attention_impl == "structured" or (
            self.attention_impl == "auto" and self.grid >= STRUCTURED_MIN_GRID[kind])

    def pattern(self, kind: str, length: int, device: torch.device) -> Pattern:
        """What a `kind` layer attends with over a stream prefix of `length` positions."""
        if length > self.image_start and self.structured(kind, device):
            rows = -(-(length - self.image_start) // self.grid)
            return block_layout(kind, self.image_start, self.grid, rows, self.conv_kernel, str(device))
        return self.mask(kind, device)[:length, :length]

    def key_table(self, kind: str, device: torch.device) -> list[torch.Tensor]:
        """Per stream position p, the key indices [K] that p may attend in a `kind` layer: its mask
        row's allowed entries, computed once for all positions (cached)."""
        key = (kind, str(device))
        if key not in self._keys:
            mask = self.mask(kind, device)
            self._keys[key] = [mask[p, :p + 1].nonzero().squeeze(1) for p in range(self.seq_len)]
        return self._keys[key]

    def embed_text(self, text_ids: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        """text_ids [B, T] (pad -1), lengths [B] -> [B, T, D] with per-position pad tokens."""
        pos = torch.arange(self.text_len, device=text_ids.device)
        ids = torch.where(pos[None] < text_lengths[:, None], text_ids.clamp(min=0), self.text_vocab + pos[None])
        return self.text_emb(ids) + self.text_pos(pos)[None]

    def embed_prefix(self, text_ids: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        """The stream before image token 0: text [B, T, D] then the start-of-image token -> [B, T+1, D]."""
        soi = self.soi.weight[None].expand(text_ids.shape[0], 1, -1)  # [B, 1, D]
        return torch.cat([self.embed_text(text_ids, text_lengths), soi], 1)

    def image_positions(self, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Row + column embeddings [1, count, D] of image positions start.. (paper §2.2)."""
        idx = torch.arange(start, start + count, device=device)
        return (self.row_emb(idx // self.grid) + self.col_emb(idx % self.grid))[None]

    def embed_image(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [B, n] at image positions start.. -> [B, n, D] (+ row and column embeddings)."""
        return self.image_emb(tokens) + self.image_positions(start, tokens.shape[1], tokens.device)

    def hidden(self, text_ids: torch.Tensor, text_lengths: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, D] of the stream text + start-of-image + image_tokens (any
        prefix length: L = T + 1 + n)."""
        x = torch.cat([self.embed_prefix(text_ids, text_lengths), self.embed_image(image_tokens)], 1)
        length = x.shape[1]
        for block, kind in zip(self.blocks, self.kinds):
            mask = self.pattern(kind, length, x.device)
            if self.checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_f(x)

    def _logits(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """h [..., D] -> fp32 logits [..., V] of the head rows `rows`, outside any autocast: the
        logits and the loss stay in 32-bit when the resblocks compute in 16-bit (§2.4)."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.head.weight[rows].float(), self.head.bias[rows].float())

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(h, slice(0, self.text_vocab))

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(h, slice(self.text_vocab, None))

    def forward(self, text_ids: torch.Tensor, text_lengths: torch.Tensor,
                image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> fp32 text logits [B, T-1, Vt] (predicting text 1..T-1) and image logits [B, N, Vi]
        (image 0..N-1, the first from the start-of-image position)."""
        h = self.hidden(text_ids, text_lengths, image_tokens[:, :-1])  # [B, T+1+N-1, D]
        t = self.text_len
        return self.text_logits(h[:, :t - 1]), self.image_logits(h[:, t:])

    # ------------------------------------------------------------------ KV-cached decoding
    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """Preallocated keys and values [2, B, H, L, Dh] for the whole stream, per layer."""
        a = self.resblocks[0].attn
        return [torch.empty(2, batch, a.n_heads, self.seq_len, a.d_head, device=device, dtype=dtype)
                for _ in self.blocks]

    def prefill(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embedded prefix x [B, P, D] -> last hidden state [B, D]; fills cache[:, :, :P]."""
        p = x.shape[1]
        for block, kind, kv in zip(self.resblocks, self.kinds, cache):
            x = block.prefill(x, self.pattern(kind, p, x.device), kv)
        return self.ln_f(x[:, -1])

    def step(self, x: torch.Tensor, pos: int, cache: KVCache, keys: list[torch.Tensor]) -> torch.Tensor:
        """Embedded token x [B, 1, D] at stream position pos -> hidden [B, D]; keys[l]: layer l's
        key_table entry of pos (its mask row)."""
        for block, kv, k in zip(self.resblocks, cache, keys):
            x = block.step(x, pos, kv, k)
        return self.ln_f(x[:, -1])


def load_prior(path: str | Path) -> DalleTransformer:
    """The one loader of a prior checkpoint (EMA weights + config):
    its stored `PriorConfig` is validated, the model built from it and every tensor checked."""
    weights, stored, _ = load_checkpoint(path)
    config = from_dict(PriorConfig, stored, str(path))
    check_weights(DalleTransformer, config, weights, str(path))
    model = DalleTransformer(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} does not match its own config: {first}") from None
    return model.eval()


def prior_config_dict(model: DalleTransformer) -> dict[str, Any]:
    """What a prior checkpoint stores as its config."""
    return as_dict(model.config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; the paper's 12B is the resblocks' count (Table 1)."""
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(int(p.numel()) for p in model.blocks.parameters())  # type: ignore[union-attr,misc]
    return total, blocks
