"""Per-resblock gradient scaling (paper §2.4, App. D)."""
from __future__ import annotations

import torch
from torch import nn

from dalle.train.grad_scale import ResblockScaler, scaled_branch


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.grad_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_branch(lambda h: torch.tanh(self.lin(h)), x, self.grad_scale)


def grads(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()], x.grad.clone()


def test_scaling_is_exact_after_unscale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), Block())
    x = torch.randn(3, 4)
    ref_p, ref_x = grads(model, x)
    model.zero_grad()
    scaler = ResblockScaler(model, init_scale=1024.0, growth_interval=10)
    scaler.states[1].scale = 8.0  # different scales per block
    p, gx = grads(model, x)
    assert not torch.allclose(p[0], ref_p[0])  # in scaled units before unscale_
    assert scaler.unscale_() and scaler.update()
    for a, b in zip([q.grad for q in model.parameters()], ref_p):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gx, ref_x)


def test_overflow_is_filtered_flagged_and_backs_off() -> None:
    model = nn.Sequential(Block(), Block())
    scaler = ResblockScaler(model, init_scale=2.0 ** 130, growth_interval=10)  # inf in fp32
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()  # non-finite values were set to zero before the identity add
    assert not scaler.unscale_()
    assert not scaler.update()
    assert scaler.skipped == 1 and all(s.scale == 2.0 ** 129 for s in scaler.states)


def test_growth_after_clean_interval() -> None:
    model = nn.Sequential(Block())
    scaler = ResblockScaler(model, init_scale=4.0, growth_interval=3)
    for _ in range(3):
        model(torch.randn(1, 4)).sum().backward()
        scaler.unscale_()
        assert scaler.update()
        model.zero_grad()
    assert scaler.states[0].scale == 8.0
    state = scaler.state_dict()
    other = ResblockScaler(nn.Sequential(Block()), 1.0, 3)
    other.load_state_dict(state)
    assert other.states[0].scale == 8.0
