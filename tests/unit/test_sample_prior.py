"""KV-cached sampling == recomputing the prefix; priming; filters (paper §2.6, §3.3)."""
from __future__ import annotations

import pytest
import torch

from dalle.models.transformer import DalleTransformer
from dalle.sample import draw_inverse_cdf, filter_logits, sample_image_tokens
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


def test_uniform_draws_do_not_depend_on_the_batch() -> None:
    """With per-row uniforms a row's tokens are the same whatever rows share its batch, the batch
    size or the decoder (what lets generate split captions over ranks)."""
    torch.manual_seed(0)
    m = DalleTransformer(prior_config(text_vocab=30, text_len=5, image_vocab=20, n_layers=2, d_model=16,
                                      n_heads=2))
    ids, lengths = torch.randint(0, 30, (3, 5)), torch.tensor([2, 5, 4])
    u = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))  # 3 captions x 2, 4x4 grid
    whole = sample_image_tokens(m, ids, lengths, 2, batch_size=6, uniforms=u)
    assert torch.equal(whole, sample_image_tokens(m, ids, lengths, 2, batch_size=4, uniforms=u))
    assert torch.equal(whole, sample_image_tokens(m, ids, lengths, 2, batch_size=3, uniforms=u,
                                                  cached=False))
    assert torch.equal(whole[2:4], sample_image_tokens(m, ids[1:2], lengths[1:2], 2, uniforms=u[2:4]))
    assert len({tuple(r) for r in whole.tolist()}) > 1  # draws, not one greedy row


def test_inverse_cdf_draws_only_tokens_the_filters_keep() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(5, -1)
    u = torch.tensor([0.0, 0.3, 0.6, 0.999999, 1.0 - 2 ** -24])
    assert set(draw_inverse_cdf(logits, u, 1.0, 2, 1.0)[:, 0].tolist()) == {0, 1}
    assert draw_inverse_cdf(logits, u, 1.0, 0, 1.0)[:, 0].tolist()[:2] == [0, 0]
    assert draw_inverse_cdf(logits, u, 1.0, 0, 1.0)[-1, 0].item() == 4
