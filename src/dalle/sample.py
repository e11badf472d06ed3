"""Autoregressive sampling of image tokens from the prior with a preallocated KV cache.

Paper §2.6 samples with temperature t = 1 and reranks; §3.3 primes with the top rows of an image
(image-to-image translation). The cache holds every layer's keys/values for the whole stream; each
new position attends the cached keys allowed by its row of the layer's sparse mask, so cached and
uncached decoding are the same computation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm import tqdm

from dalle.models.transformer import DalleTransformer
from dalle.precision import autocast


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> temperature-scaled logits with everything outside top-k / top-p at -inf."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)  # [B, 1]


def draw_inverse_cdf(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int,
                     top_p: float) -> torch.Tensor:
    """logits [B, V], uniforms u [B] in [0, 1) -> tokens [B, 1]: the first token whose cumulative
    probability exceeds u (each row's draw depends on its own uniform only, not on the batch)."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)  # [B, V]
    cdf = probs.cumsum(-1)  # [B, V]
    tok = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True)  # [B, 1]
    last = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)  # [B, 1]
    return torch.minimum(tok, last)  # u * total rounded up to total: the last possible token


def _decode_cached(model: DalleTransformer, text_ids: torch.Tensor, lengths: torch.Tensor,
                   prime: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One batch: text [b, T], prime [b, R] -> image tokens [b, N]. Everything a step needs but
    the new token is prepared once: the KV cache, every layer's key indices per position, the
    image position embeddings and the image half of the output head."""
    n, t, dev = model.grid * model.grid, model.image_start, text_ids.device  # t: image 0's position
    out = torch.empty(text_ids.shape[0], n, dtype=torch.long, device=dev)
    out[:, :prime.shape[1]] = prime
    cache = model.new_cache(text_ids.shape[0], dev, _cache_dtype(model, dev))
    tables = [model.key_table(kind, dev) for kind in model.kinds]
    pos_emb = model.image_positions(0, n, dev)  # [1, N, D]
    w_img = model.head.weight[model.text_vocab:].float().t().contiguous()  # [D, Vi], fp32 logits
    b_img = model.head.bias[model.text_vocab:].float().contiguous()
    x = torch.cat([model.embed_prefix(text_ids, lengths), model.embed_image(prime)], 1)  # [b, T+1+R, D]
    h = model.prefill(x, cache)  # [b, D]
    for i in range(prime.shape[1], n):
        with torch.autocast(dev.type, enabled=False):
            tok = draw(torch.addmm(b_img, h.float(), w_img))  # [b, 1]
        out[:, i:i + 1] = tok
        if i + 1 < n:
            x = model.image_emb(tok) + pos_emb[:, i:i + 1]  # [b, 1, D]
            h = model.step(x, t + i, cache, [table[t + i] for table in tables])
    return out


def _cache_dtype(model: DalleTransformer, device: torch.device) -> torch.dtype:
    """Keys and values are cached in the dtype the attention computes them in (16-bit under
    autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.head.weight.dtype


def _decode_uncached(model: DalleTransformer, text_ids: torch.Tensor, lengths: torch.Tensor,
                     prime: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reference decoder: recomputes the whole prefix for every token (for tests and benchmarks)."""
    out = prime.clone()
    for _ in range(prime.shape[1], model.grid * model.grid):
        h = model.hidden(text_ids, lengths, out)[:, -1]  # [b, D]
        out = torch.cat([out, draw(model.image_logits(h))], 1)
    return out


@torch.inference_mode()
def sample_image_tokens(model: DalleTransformer, text_ids: torch.Tensor, text_lengths: torch.Tensor,
                        n_per_caption: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        batch_size: int = 16, generator: Optional[torch.Generator] = None,
                        prime_tokens: Optional[torch.Tensor] = None, cached: bool = True,
                        progress: bool = False, precision: str = "fp32",
                        uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Captions text_ids [B, T] (pad -1), lengths [B] -> image tokens LongTensor [B*n, grid²].

    Rows are caption-major (caption 0's n candidates first). prime_tokens [B, R] (paper §3.3:
    the first R rows of an image) are kept and the remaining positions sampled. `precision`
    (a resolved one: fp32, bf16, fp16) is the autocast of the transformer; logits stay fp32.
    `uniforms` [B*n, grid²] (caption-major rows, in [0, 1)), when given, replace `generator`:
    position p of row r is drawn by inverse CDF from uniforms[r, p], so a row's tokens do not
    depend on which rows share its batch or on the batch size (beyond float rounding).
    """
    model.eval()
    device = model.head.weight.device
    ids = text_ids.to(device).repeat_interleave(n_per_caption, 0)
    lengths = text_lengths.to(device).repeat_interleave(n_per_caption, 0)
    prime = (prime_tokens.to(device).long().repeat_interleave(n_per_caption, 0) if prime_tokens is not None
             else torch.zeros(ids.shape[0], 0, dtype=torch.long, device=device))
    decode = _decode_cached if cached else _decode_uncached

    chunks = []
    for s in tqdm(range(0, ids.shape[0], batch_size), desc="sampling", unit="batch", disable=not progress):
        e = s + batch_size
        draw = _drawer(temperature, top_k, top_p, generator,
                       None if uniforms is None else uniforms[s:e].to(device), prime.shape[1])
        with autocast(precision, device):
            chunks.append(decode(model, ids[s:e], lengths[s:e], prime[s:e], draw))
    return torch.cat(chunks, 0)


def _drawer(temperature: float, top_k: int, top_p: float, generator: Optional[torch.Generator],
            uniforms: Optional[torch.Tensor], start: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The draw of one batch: logits [b, V] -> tokens [b, 1], for positions start, start+1, ...
    in order (both decoders call it once per position)."""
    if uniforms is None:
        return lambda logits: _draw(logits, temperature, top_k, top_p, generator)
    position = [start]

    def draw(logits: torch.Tensor) -> torch.Tensor:
        tok = draw_inverse_cdf(logits, uniforms[:, position[0]], temperature, top_k, top_p)
        position[0] += 1
        return tok

    return draw
