"""An inf injected into one resblock's gradient during the prior's training (paper §2.4, App. D):
the step is skipped and counted, only that resblock's scale backs off, training continues to the
end with finite weights."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dalle.io import load_checkpoint, read_json
from dalle.train import prior as prior_mod
from tests.integration.test_prior_stage import params, run, write_tokens

INJECT_AT = 3  # the 0-based step whose backward pass meets an inf


def test_inf_gradient_is_skipped_counted_and_backs_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tokens(tmp_path)
    seen: dict[str, Any] = {}
    real = prior_mod.PriorTrainer.step

    def one_step(self: prior_mod.PriorTrainer, i: int) -> Any:
        seen["trainer"] = self
        if i != INJECT_AT:
            return real(self, i)
        mlp = self.model.blocks[1].mlp  # [B, L, D] out; its gradient becomes inf
        def poison(_m: Any, _i: Any, out: torch.Tensor) -> None:
            out.register_hook(lambda g: torch.full_like(g, math.inf))

        handle = mlp.register_forward_hook(poison)
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            out = real(self, i)
        finally:
            handle.remove()
        seen["unchanged"] = all(torch.equal(before[k], v) for k, v in self.model.state_dict().items())
        seen["stats"] = out.stats
        return out

    monkeypatch.setattr(prior_mod.PriorTrainer, "step", one_step)
    metrics = run(params(tmp_path, ("prior.precision=bf16", "prior.checkpointing=false")))
    trainer = seen["trainer"]
    assert seen["unchanged"], "the weights moved on the step with an inf gradient"
    assert seen["stats"]["skipped_steps"] == 1.0 and metrics["skipped_steps"] == 1.0
    assert metrics["steps"] == 6 and trainer.done == 6  # training went on to the end
    init = trainer.cfg.grad_scale_init
    assert [s.scale for s in trainer.scaler.states] == [init, init / 2]  # only block 1 backed off
    assert read_json(tmp_path / "metrics/prior.json")["skipped_steps"] == 1.0
    weights, _, _ = load_checkpoint(tmp_path / "models/prior.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert math.isfinite(metrics["val_loss"])
