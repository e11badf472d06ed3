"""A tiny decoder stack with the prior's matrix structure (separate q, k, v, o; 4x MLP) and a
training loop over `ShardedStrategy`, used by tests/distributed and benchmarks/bench_distributed.

The loop is the reference of how a trainer drives the strategy: per-rank checkpoints (shard
slices, Adam state, PowerSGD error buffers) written atomically, resumed from the newest step that
every rank has.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dalle.distributed.strategy import ShardedStrategy
from dalle.distributed.checkpoint import resume_rank, save_rank


@dataclass(frozen=True)
class ToyConfig:
    vocab: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 16
    batch_size: int = 16  # global batch, split over all ranks
    lr: float = 3e-3
    grad_clip: float = 4.0
    ema_decay: float = 0.99
    seed: int = 0


class ToyBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(ToyBlock(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def toy_batch(cfg: ToyConfig, step: int) -> torch.Tensor:
    """Step-indexed data (identical on every rank, no state to resume): x_t = x_{t-1} + x_{t-2}."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + step)
    x = torch.zeros(cfg.batch_size, cfg.seq_len, dtype=torch.long)
    x[:, :2] = torch.randint(0, cfg.vocab, (cfg.batch_size, 2), generator=g)
    for t in range(2, cfg.seq_len):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % cfg.vocab
    return x


def train_toy(cfg: ToyConfig, strategy: ShardedStrategy, steps: int, ckpt_dir: Optional[Path] = None,
              ckpt_every: int = 0, stop_after: Optional[int] = None) -> dict[str, list[float]]:
    """Train `steps` steps (resuming from ckpt_dir); world-mean loss per step + timings."""
    model = strategy.wrap(ToyModel(cfg))
    opt = torch.optim.Adam(strategy.parameters(), lr=cfg.lr)
    start = resume_rank(ckpt_dir, strategy, opt)[0] if ckpt_dir else 0
    out: dict[str, list[float]] = {"step": [], "loss": [], "seconds": [], "wire_bytes": []}
    for step in range(start, steps):
        t0 = time.perf_counter()
        tokens = toy_batch(cfg, step)[strategy.batch_slice(cfg.batch_size)]  # [b, T]
        strategy.before_forward()
        logits = model(tokens[:, :-1].contiguous())  # [b, T-1, V]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        strategy.after_backward()
        strategy.clip_grad_norm_(cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        strategy.ema_update(cfg.ema_decay)
        out["step"].append(step + 1)
        out["loss"].append(strategy.mean(loss.item()))
        out["seconds"].append(time.perf_counter() - t0)
        out["wire_bytes"].append(strategy.wire_bytes_last)
        if ckpt_dir and ckpt_every and (step + 1) % ckpt_every == 0:
            save_rank(Path(ckpt_dir), strategy, opt, step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            break
    out["state_bytes"] = [_state_bytes(strategy, opt)]
    return out


def _state_bytes(strategy: ShardedStrategy, opt: torch.optim.Optimizer) -> int:
    """Bytes this rank keeps between steps: its parameter slices + their Adam state."""
    tensors: list[torch.Tensor] = list(strategy.parameters())
    tensors += [t for p in strategy.parameters() for t in opt.state[p].values()
                if torch.is_tensor(t) and t.ndim]
    return sum(t.numel() * t.element_size() for t in tensors)
