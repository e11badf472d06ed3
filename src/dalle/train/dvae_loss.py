"""The dVAE evidence lower bound and codebook statistics (paper §2.1, App. A.2-A.3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dalle.models.dvae import DiscreteVAE, logit_laplace_log_prob, map_pixels, unmap_pixels


@dataclass
class ElbTerms:
    loss: torch.Tensor  # scalar to minimise: (nll + beta * kl) / (H*W*3), mean over batch
    nll: torch.Tensor  # reconstruction -ln p(x|z) per dimension (nats/dim)
    kl: torch.Tensor  # KL(q(z|x) || uniform) per dimension (nats/dim)
    mse: torch.Tensor  # squared error of unmap(sigmoid(mu)) in [0,1] pixels
    codes: torch.Tensor  # argmax codes [B, h*w] of this batch, for usage statistics


@dataclass(frozen=True)
class BatchPart:
    """Data parallelism (dalle.distributed.data_parallel): this process holds rows `rows` of a
    global batch of `total` rows; `gather` returns every rank's rows of a tensor in rank order,
    differentiably. Randomness one process draws for the batch is drawn for all `total` rows
    and sliced, batch statistics are computed over the gathered rows."""

    rows: slice
    total: int
    gather: Callable[[torch.Tensor], torch.Tensor]


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || U(K)) summed over grid positions: logits [B, K, h, w] -> [B]."""
    log_q = F.log_softmax(logits, dim=1)  # [B, K, h, w]
    kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=1)  # [B, h, w]
    return kl.flatten(1).sum(1)


def usage_kl(logits: torch.Tensor, part: Optional[BatchPart] = None) -> torch.Tensor:
    """KL(q_bar || U(K)) of the batch's mean posterior q_bar = mean over images and positions of
    q(z|x): 0 when the batch uses every code equally. Not in the paper (its KL term is per position
    and does not ask positions to differ); `dvae.usage_weight` turns it on against collapse."""
    q_bar = F.softmax(logits, dim=1).mean(dim=(0, 2, 3))  # [K]
    if part is not None:  # the global batch's mean: the ranks' equal-sized means, averaged
        q_bar = part.gather(q_bar[None]).mean(dim=0)  # [ranks, K] -> [K]
    return (q_bar * (q_bar.clamp_min(1e-12).log() + math.log(logits.shape[1]))).sum()


def uniform_noise(logits: torch.Tensor, part: Optional[BatchPart] = None) -> torch.Tensor:
    """U(0, 1) like `logits` [B, K, h, w]; under data parallelism the rows `part.rows` of the
    draw one process makes for the global batch (same shape and memory layout, same generator)."""
    if part is None:
        return torch.rand_like(logits)
    strides = logits.stride()
    order = sorted(range(logits.dim()), key=lambda d: (-strides[d], d))  # memory order
    shape = (part.total, *logits.shape[1:])
    full = torch.empty([shape[d] for d in order], dtype=logits.dtype, device=logits.device)
    full = full.permute(*[order.index(d) for d in range(logits.dim())]).uniform_()  # as rand_like
    return full[part.rows]


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False,
                   part: Optional[BatchPart] = None) -> torch.Tensor:
    """F.gumbel_softmax over dim 1, with the noise drawn as -ln(-ln U): torch's exponential_()
    sampler is single-threaded and took 13% of a default training step; rand_like is 5x faster."""
    u = uniform_noise(logits, part).clamp_(1e-10, 1.0)  # [B, K, h, w]
    y = ((logits - u.log_().neg_().log_()) / tau).softmax(dim=1)  # gumbel = -ln(-ln U)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(1, y.argmax(dim=1, keepdim=True), 1.0)
    return one_hot - y.detach() + y  # straight-through: one-hot forward, relaxed gradient


def elb_terms(model: DiscreteVAE, images: torch.Tensor, tau: float, beta: float,
              hard: bool = False, usage_weight: float = 0.0, part: Optional[BatchPart] = None) -> ElbTerms:
    """images: float [B, 3, H, W] in [0,1]. Paper §2.1: gumbel-softmax relaxation at temperature
    tau, KL weight beta; App. A.2: the loss is divided by H*W*3 (beta/192 at 256^2, 32^2 grid).
    hard=True is the straight-through variant (one-hot forward, relaxed gradient; not the paper's);
    usage_weight > 0 adds usage_weight * usage_kl counted once per grid position, in beta's units.
    `part`: this process's rows of a data-parallel global batch (BatchPart); None: one process."""
    x = map_pixels(images)  # paper App. A.3: eps-mapped pixels
    logits = model.encoder(x).float()  # [B, K, h, w]
    z = gumbel_softmax(logits, tau, hard, part)  # relaxed one-hot [B, K, h, w]
    mu, ln_b = model.decode_stats(z)  # each [B, 3, H, W]
    n_dims = images[0].numel()  # H*W*3
    nll = -logit_laplace_log_prob(x.float(), mu, ln_b).flatten(1).sum(1) / n_dims  # [B]
    kl = kl_to_uniform(logits) / n_dims  # [B]
    loss = (nll + beta * kl).mean()
    if usage_weight:
        loss = loss + usage_weight * usage_kl(logits, part) * logits[0, 0].numel() / n_dims
    with torch.no_grad():
        mse = (unmap_pixels(torch.sigmoid(mu)) - images.float()).pow(2).mean()
    return ElbTerms(loss, nll.mean().detach(), kl.mean().detach(), mse,
                    logits.detach().argmax(1).flatten(1))


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity exp(H(usage)) of the code histogram and the fraction of codes used at least once."""
    return usage_of(torch.bincount(codes.reshape(-1).long(), minlength=vocab_size).double())


def usage_of(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity and codes used of a code histogram counts [K]."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"perplexity": math.exp(entropy), "codes_used": float((counts > 0).double().mean())}
