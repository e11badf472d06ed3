"""Structured (block-layout) sparse attention == the masked attention it replaces (paper App. B.1).

Forward and gradients are compared against SDPA fed the brute-force stream mask, for every
layer kind, full and partial image prefixes; then the model-level switch and the decoding tables.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_masks_prior import brute

from dalle.models.attention import block_layout, structured_attention
from dalle.models.transformer import DalleTransformer
from dalle.train.prior_loop import autocast_for, prior_loss
from tests.helpers import prior_config


def brute_stream(kind: str, t: int, grid: int, k: int) -> torch.Tensor:
    n = grid * grid
    m = torch.zeros(t + n, t + n, dtype=torch.bool)
    m[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    m[t:, :t] = True
    m[t:, t:] = brute(kind, grid, k)
    return m


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("grid,n,k", [(4, 16, 3), (5, 24, 5), (6, 7, 11), (5, 1, 3)])
def test_structured_equals_masked_forward_and_gradients(kind: str, grid: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(grid * 100 + n)
    t = 3
    q, key, v = (torch.randn(2, 2, t + n, 8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    mask = brute_stream(kind, t, grid, k)[:t + n, :t + n]
    ref = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)
    lay = block_layout(kind, t, grid, -(-n // grid), k, "cpu")
    out = structured_attention(q, key, v, lay)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    up = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, key, v), up), torch.autograd.grad(ref, (q, key, v), up)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def pair(grid: int = 4, dropout: float = 0.0) -> tuple[DalleTransformer, DalleTransformer]:
    torch.manual_seed(0)
    kw = dict(grid=grid, n_layers=5, d_model=32, n_heads=2, conv_kernel=3, dropout=dropout)
    a = DalleTransformer(prior_config(attention_impl="structured", **kw))
    b = DalleTransformer(prior_config(attention_impl="masked", **kw))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_structured_equals_masked(precision: str) -> None:
    a, b = pair()
    assert a.kinds == ["row", "column", "row", "row", "conv"]
    g = torch.Generator().manual_seed(1)
    ids, lengths = torch.randint(0, 40, (3, 6), generator=g), torch.tensor([2, 6, 4])
    img = torch.randint(0, 24, (3, 16), generator=g)
    losses = []
    for m in (a, b):
        with autocast_for(precision, torch.device("cpu")):
            loss, _ = prior_loss(m, ids, lengths, img)
        loss.backward()
        losses.append(loss)
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(losses[0], losses[1], rtol=tol, atol=tol)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * 0.1, msg=name)


def test_auto_picks_blocks_where_they_pay_on_cpu_without_dropout() -> None:
    cpu = torch.device("cpu")
    small, mid, big = (DalleTransformer(prior_config(text_vocab=10, text_len=4, image_vocab=8, grid=g,
                                                     n_layers=3, d_model=16, n_heads=2, conv_kernel=11))
                       for g in (8, 16, 32))
    assert not any(small.structured(kind, cpu) for kind in ("row", "column", "conv", "full"))
    assert mid.structured("column", cpu) and not mid.structured("row", cpu) and not mid.structured("conv", cpu)
    assert big.structured("row", cpu) and big.structured("conv", cpu) and not big.structured("full", cpu)
    assert not big.structured("conv", torch.device("meta"))  # the block path uses the CPU flash kernels
    assert isinstance(big.pattern("row", 4, cpu), torch.Tensor)  # text only: plain mask
    drop, _ = pair(32, dropout=0.1)
    assert not drop.structured("row", cpu) and drop.eval().structured("row", cpu)  # dropout: masked
    with pytest.raises(ValueError, match="attention_impl"):
        prior_config(attention_impl="sparse-ish")


@pytest.mark.parametrize("kind", ["row", "column", "conv", "full"])
def test_decoding_key_tables_are_the_mask_rows(kind: str) -> None:
    m = DalleTransformer(prior_config(text_vocab=10, text_len=3, image_vocab=8, grid=5, n_layers=1,
                                      d_model=8, n_heads=1, conv_kernel=3))
    table = m.key_table(kind, torch.device("cpu"))
    mask = brute_stream(kind, 3 + 1, 5, 3)  # text, then the start-of-image token, causal with it
    assert len(table) == m.seq_len
    for p, keys in enumerate(table):
        assert keys.tolist() == mask[p].nonzero().squeeze(1).tolist(), p


def test_prior_loss_warns_nothing() -> None:
    a, _ = pair()
    ids, lengths, img = torch.randint(0, 40, (2, 6)), torch.tensor([1, 6]), torch.randint(0, 24, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for precision in ("fp32", "bf16"):
            with autocast_for(precision, torch.device("cpu")):
                loss, stats = prior_loss(a, ids, lengths, img)
            loss.backward()
            assert all(isinstance(v, float) for v in stats.values())


def test_structured_under_activation_checkpointing() -> None:
    a, b = pair()
    a.checkpointing = True
    ids, lengths, img = torch.randint(0, 40, (2, 6)), torch.tensor([3, 6]), torch.randint(0, 24, (2, 16))
    for m in (a, b):
        prior_loss(m, ids, lengths, img)[0].backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
