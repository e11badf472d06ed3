"""16-bit parameters and Adam moments (paper §2.4; dalle.train.half): the optimiser's arithmetic,
the 16-bit compensation that keeps small updates, scaled fp16 gradients that never underflow,
and the bytes per parameter measured on the prior's trainer."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from dalle.models.transformer import DalleTransformer
from dalle.train import half
from dalle.train.common import LocalStrategy
from dalle.train.prior import PriorTrainer
from dalle.train.prior_data import TokenSet
from tests.helpers import prior_config, section


def test_fp32_parameters_follow_torch_adamw_exactly() -> None:
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(6, 5))
    b.data.copy_(a.data)
    ours = half.HalfAdamW([a], lr=1e-2, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,lr", [(torch.bfloat16, 1e-5), (torch.float16, 1e-6)])
def test_the_compensation_keeps_updates_below_one_16_bit_ulp(dtype: torch.dtype, lr: float) -> None:
    """Weights ~0.02 (the prior's init scale), updates of ~lr: below half a 16-bit ulp there
    (bf16: 3e-5..6e-5, fp16: 3.8e-6..7.6e-6). Rounded alone (no compensation) the weights never
    move; with it, the master weight p + comp moves as fp32 AdamW's does."""
    w0 = torch.linspace(0.01, 0.03, 64).view(8, 8).to(dtype)
    p, bare, ref = (nn.Parameter(w0.clone()), nn.Parameter(w0.clone()), nn.Parameter(w0.float()))
    ours, rounded = half.HalfAdamW([p], lr=lr), half.HalfAdamW([bare], lr=lr)
    fp32 = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        grad = torch.randn(8, 8, generator=g).abs() + 0.1  # one sign: the weights drift down
        p.grad, bare.grad, ref.grad = grad.to(dtype), grad.to(dtype), grad.to(dtype).float()
        ours.step(), rounded.step(), fp32.step()
        rounded.state[bare]["comp"].zero_()  # no master state: only the 16-bit weight
    with torch.no_grad():
        master = p.float() + ours.state[p]["comp"].float()
        moved, moved32 = w0.float() - master, w0.float() - ref
    assert torch.equal(bare.detach(), w0)  # every update rounded away
    assert moved32.min() > 200 * lr  # fp32: 300 steps of ~lr
    rel = (moved - moved32).abs() / moved32  # measured: mean 0.3%, max 1.0% (16-bit pair, bf16 moments)
    assert rel.mean() < 0.01 and rel.max() < 0.03, (float(rel.mean()), float(rel.max()))
    assert ours.state[p]["exp_avg"].dtype == ours.state[p]["exp_avg_sq"].dtype == torch.bfloat16


def test_scaled_fp16_gradients_are_unscaled_in_fp32_not_in_fp16() -> None:
    """A true gradient of 1e-9 is below fp16's smallest subnormal (6e-8): in units of a block scale
    2^20 it is representable, and the optimiser unscales it in fp32 through the factor."""
    p = nn.Parameter(torch.ones(4, 4, dtype=torch.float16))
    p.grad = torch.full((4, 4), 1e-9 * 2 ** 20, dtype=torch.float16)  # scaled units
    assert (p.grad.float() / 2 ** 20).half().eq(0).all()  # unscaling in fp16 underflows to 0
    opt = half.HalfAdamW([p], lr=1e-3)
    opt.step(factors={p: 2.0 ** -20})
    m = opt.state[p]["exp_avg"].float()
    torch.testing.assert_close(m, torch.full((4, 4), 0.1e-9), rtol=1e-2, atol=0)
    ref = nn.Parameter(torch.ones(4, 4))
    ref.grad = torch.full((4, 4), 1e-9)  # the true gradient, in fp32
    torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0).step()
    master = p.float() + opt.state[p]["comp"].float()
    assert (1 - ref.detach()).min() > 5e-5  # a real step (eps 1e-8 tempers it)
    torch.testing.assert_close(master, ref.detach(), rtol=0, atol=1e-6)


def test_clipping_of_16_bit_gradients_goes_through_the_factors() -> None:
    a = nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))
    b = nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.full((2, 2), 6.0 * 8, dtype=torch.bfloat16), torch.full((2,), 8.0)
    factors = {a: 1 / 8}  # a's true gradient is 6 per element
    norm = half.clip_grad_norm_([a, b], factors, max_norm=1.0)
    assert norm == pytest.approx((4 * 36 + 2 * 64) ** 0.5)
    assert half.true_grad(a, factors).pow(2).sum() + b.grad.pow(2).sum() == pytest.approx(1.0, rel=1e-4)
    assert a.grad.float().eq(48.0).all()  # the 16-bit gradient itself was not touched


def _trainer(precision: str, store: bool) -> PriorTrainer:
    cfg = section("prior", precision=precision, store_16bit=store, batch_size=8)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 40, (16, 6), generator=g)
    data = TokenSet(torch.randint(0, 24, (16, 16), generator=g), text, torch.full((16,), 6), ["c"] * 16)
    torch.manual_seed(0)
    model = DalleTransformer(prior_config(n_layers=2, d_model=64, n_heads=4))
    return PriorTrainer(cfg, model, LocalStrategy(), data, None, 0, precision)


def test_bytes_per_resblock_parameter_measured_on_the_trainer() -> None:
    """Parameters + gradients + optimiser state of the resblock matrices after one step."""
    per_param = {}
    for precision, store in (("fp32", False), ("bf16", True)):
        trainer = _trainer(precision, store)
        trainer.step(0)
        mats = [p for p in trainer.model.blocks.parameters() if p.ndim >= 2]
        for p in mats:  # zero_grad(set_to_none) freed them: count what backward allocates
            p.grad = torch.zeros_like(p)
        b = half.state_bytes(mats, trainer.opt)
        per_param[precision] = (b["params"] + b["grads"] + b["optimizer"]) / b["numel"]
    assert per_param == {"fp32": 16.0, "bf16": 10.0}
    fp32_store = _trainer("bf16", False)  # 16-bit arithmetic, fp32 storage: nothing converted
    assert all(p.dtype == torch.float32 for p in fp32_store.model.parameters())


def _loop(trainer: PriorTrainer, path: Any, steps: int) -> Any:
    from dalle.tracking import NullTracker
    from dalle.train.loop import Cadence, LocalStore, Loop

    return Loop("t", trainer.model, trainer.opt, trainer.strategy, Cadence(steps, 1, 2, 0.9),
                LocalStore(path, {"k": 1}), NullTracker(), trainer.step, trainer.log_row,
                extra_state=trainer.extra_state, load_extra=trainer.load_extra)


def test_a_16_bit_run_resumes_exactly(tmp_path: Any) -> None:
    """Weights, 16-bit compensation, bf16 moments, scales: a killed run continues bit for bit."""
    straight = _trainer("bf16", True)
    _loop(straight, tmp_path / "a.safetensors", 4).run()
    first = _trainer("bf16", True)
    step = first.step
    first.step = lambda i: step(i) if i < 3 else (_ for _ in ()).throw(KeyboardInterrupt())  # type: ignore[method-assign]
    killed = _loop(first, tmp_path / "b.safetensors", 4)
    with pytest.raises(KeyboardInterrupt):
        killed.run()  # saved at step 2, dies in step 3
    again = _trainer("bf16", True)
    resumed = _loop(again, tmp_path / "b.safetensors", 4)
    resumed.run()
    assert resumed.step == 4
    for a, b in zip(straight.model.parameters(), again.model.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for p, q in zip(straight.model.parameters(), again.model.parameters()):
        sa, sb = straight.opt.state[p], again.opt.state[q]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
