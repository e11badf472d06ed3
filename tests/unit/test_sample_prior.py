"""KV-cached sampling == recomputing the prefix; priming; filters (paper §2.6, §3.3)."""
from __future__ import annotations

import pytest
import torch

from dalle.models.transformer import DalleTransformer
from dalle.sample import filter_logits, sample_image_tokens
from tests.helpers import prior_config


@pytest.mark.parametrize("attention,impl", [("sparse", "masked"), ("sparse", "structured"), ("full", "auto")])
def test_greedy_cached_equals_uncached(attention: str, impl: str) -> None:
    torch.manual_seed(0)
    m = DalleTransformer(prior_config(text_vocab=30, text_len=5, image_vocab=20, grid=5, n_layers=5,
                                      n_heads=2, attention=attention, attention_impl=impl))
    ids, lengths = torch.randint(0, 30, (2, 5)), torch.tensor([2, 5])
    a = sample_image_tokens(m, ids, lengths, 2, top_k=1, batch_size=3)
    b = sample_image_tokens(m, ids, lengths, 2, top_k=1, batch_size=4, cached=False)
    assert a.shape == (4, 25) and torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = sample_image_tokens(m, ids, lengths, 2, generator=g1, batch_size=4)
    s2 = sample_image_tokens(m, ids, lengths, 2, generator=g2, batch_size=4, cached=False)
    assert torch.equal(s1, s2)  # same random draws, same logits


@pytest.mark.parametrize("impl", ["masked", "structured"])
def test_priming_keeps_the_given_rows(impl: str) -> None:
    torch.manual_seed(0)
    m = DalleTransformer(prior_config(text_vocab=30, text_len=5, image_vocab=20, n_layers=2, d_model=16,
                                      n_heads=2, attention_impl=impl))
    prime = torch.randint(0, 20, (1, 8))  # the first 2 rows of a 4x4 grid
    out = sample_image_tokens(m, torch.zeros(1, 5, dtype=torch.long), torch.tensor([3]), 3,
                              prime_tokens=prime, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 16) and torch.equal(out[:, :8], prime.expand(3, -1))
    assert int(out.max()) < 20


def test_top_k_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 1.0, top_k=2)[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, 1.0, top_p=0.8)[0])
    probs = logits.softmax(-1)[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[:2].sum() >= 0.8 > probs[0]
