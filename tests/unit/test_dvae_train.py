"""dVAE objective, schedules, data order and kill/resume (paper §2.1, App. A.2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dalle.data.dedup import run_dedup
from dalle.data.prepare import prepare
from dalle.data.synthetic import collect_synthetic
from dalle.errors import CheckpointError
from dalle.io import load_checkpoint
from dalle.models.dvae import DiscreteVAE
from dalle.tracking import NullTracker
from dalle.train.dvae import DVAETrainer, batch_indices, schedules, train_dvae
from dalle.train.dvae_loss import codebook_usage, elb_terms, gumbel_softmax, kl_to_uniform, usage_kl
from tests.helpers import art_at, dvae_config, section

TINY = dict(vocab_size=32, n_hid=8, n_blk_per_group=1, group_count=2, n_init=8, dec_n_hid=8,
            steps=6, batch_size=4, lr=1e-3, lr_final=1e-5, tau_frac=0.5, kl_frac=0.5, lr_frac=1.0,
            ema_decay=0.9, log_every=1, checkpoint_every=2, channels_last=False, kl_max=6.6,
            usage_weight=0.0)
ARCH = dict(vocab_size=32, n_hid=8, n_blk_per_group=1, group_count=2, n_init=8, dec_n_hid=8,
            image_size=8)


def DVAE(**kw):  # noqa: N802 - the section, from params.yaml with these values
    return section("dvae", **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: thread hand-offs cost more than the math, above all on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_kl_to_uniform_zero_for_uniform_and_log_k_for_one_hot():
    k = 16
    assert kl_to_uniform(torch.zeros(2, k, 3, 3)).abs().max() < 1e-6
    one_hot = torch.full((1, k, 1, 1), -1e4)
    one_hot[0, 3] = 0
    assert kl_to_uniform(one_hot).item() == pytest.approx(math.log(k), rel=1e-4)


def test_elb_gradients_reach_encoder_and_decoder():
    model = DiscreteVAE(dvae_config(**ARCH))
    terms = elb_terms(model, torch.rand(2, 3, 8, 8), tau=1.0, beta=6.6)
    terms.loss.backward()
    assert model.encoder.blocks.input.w.grad.abs().sum() > 0
    assert model.decoder.blocks.output.conv.w.grad.abs().sum() > 0
    assert terms.kl >= 0 and terms.codes.shape == (2, 16)


def test_schedules_follow_paper_shape():
    cfg = DVAE(**{**TINY, "steps": 1000, "tau_frac": 0.2, "kl_frac": 0.1, "lr_frac": 0.5,
                  "tau_final": 1 / 16})
    start, end = schedules(cfg, 0), schedules(cfg, 1000)
    assert start["tau"] == 1.0 and start["beta"] == 0.0 and start["lr"] == 1e-3
    assert schedules(cfg, 200)["tau"] == pytest.approx(1 / 16)  # tau 1 -> 1/16
    assert schedules(cfg, 100)["beta"] == pytest.approx(6.6)  # beta 0 -> 6.6
    assert end["lr"] == pytest.approx(1e-5)
    assert schedules(cfg, 50)["beta"] == pytest.approx(3.3)  # cosine midpoint


def test_batch_indices_cover_an_epoch_without_repeats_and_are_deterministic():
    seen = torch.cat([batch_indices(20, 5, s, seed=1) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(20))
    assert torch.equal(batch_indices(20, 5, 7, 1), batch_indices(20, 5, 7, 1))
    assert not torch.equal(batch_indices(20, 5, 0, 1), batch_indices(20, 5, 4, 1))  # new epoch


def test_codebook_usage():
    usage = codebook_usage(torch.arange(8).repeat(3), vocab_size=16)
    assert usage["perplexity"] == pytest.approx(8.0) and usage["codes_used"] == 0.5


class _Killer(NullTracker):
    def __init__(self, at: int | None) -> None:
        self.at, self.steps = at, []

    def log_metrics(self, metrics, step=None):  # noqa: ANN001
        if "loss" in metrics:
            self.steps.append(step)
            if step == self.at:
                raise KeyboardInterrupt


def _world(root):  # noqa: ANN001 - a tiny synthetic world at 8 px (collect, dedup, prepare)
    art = art_at(root)
    data = section("data", image_size=8, shard_size=40,
                   synthetic={**section("data").synthetic.model_dump(), "n_images": 40})
    collect_synthetic(data, art, NullTracker(), seed=0, workers=1)
    run_dedup(art, NullTracker(), section("dedup"), workers=1)
    prepare(art, NullTracker(), section("prepare", workers=1), image_size=8)
    return art


LOADER = section("loader")


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    cfg = DVAE(**TINY)
    a_art, b_art = _world(tmp_path / "a"), _world(tmp_path / "b")
    train_dvae(a_art, NullTracker(), cfg, LOADER, 0)
    killer = _Killer(at=3)
    with pytest.raises(KeyboardInterrupt):
        train_dvae(b_art, killer, cfg, LOADER, 0)
    assert b_art.dvae_state.exists()  # checkpoint at step 2
    resumed = _Killer(at=None)
    metrics = train_dvae(b_art, resumed, cfg, LOADER, 0)
    assert resumed.steps[0] == 3  # continued after the step-2 checkpoint
    assert not b_art.dvae_state.exists()
    a, conf, _ = load_checkpoint(a_art.dvae)
    b, _, _ = load_checkpoint(b_art.dvae)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert next(iter(a)).split(".")[0] in {"encoder", "decoder"} and conf["image_size"] == 8
    assert metrics["val_perplexity"] >= 1 and 0 < metrics["val_codes_used"] <= 1


def test_resume_from_other_config_names_the_key(tmp_path):
    art = _world(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train_dvae(art, _Killer(at=3), DVAE(**TINY), LOADER, 0)
    with pytest.raises(CheckpointError, match=r"lr is 0.001 in the checkpoint but 0.002"):
        train_dvae(art, NullTracker(), DVAE(**{**TINY, "lr": 2e-3}), LOADER, 0)


def test_zero_init_logits_starts_every_code_equal():
    """Our choice (docs/decisions.md): with the released init one code wins everywhere at step 0
    (the mapped pixels' DC term), the start of the codebook collapse the paper's footnote 4 names."""
    x = torch.rand(4, 3, 8, 8)
    for zero in (True, False):
        trainer = DVAETrainer(DVAE(**{**TINY, "zero_init_logits": zero}), None, 8, 0)
        logits = trainer.model.logits(x)  # [4, K, 4, 4]
        spread = (logits - logits.mean(1, keepdim=True)).abs().max().item()
        assert (spread == 0.0) is zero


def test_straight_through_trains_and_reaches_the_encoder():
    model = DiscreteVAE(dvae_config(**ARCH))
    terms = elb_terms(model, torch.rand(2, 3, 8, 8), tau=0.5, beta=1.0, hard=True)
    terms.loss.backward()
    assert model.encoder.blocks.output.conv.w.grad.abs().sum() > 0


def test_gumbel_noise_samples_the_categorical_and_hard_is_one_hot():
    """Gumbel-max property (paper §2.1 relaxation): argmax(logits + g) ~ softmax(logits); at
    small tau the relaxed sample is nearly one-hot; hard=True is exactly one-hot forward."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, -1.0, 0.5]).view(1, 4, 1, 1).expand(20000, 4, 1, 1)
    soft = gumbel_softmax(logits, tau=1.0)  # [N, 4, 1, 1]
    assert torch.allclose(soft.sum(1), torch.ones(20000, 1, 1), atol=1e-5)
    freq = torch.bincount(soft.argmax(1).flatten(), minlength=4).float() / 20000
    assert torch.allclose(freq, logits[0].flatten().softmax(0), atol=0.015)
    assert gumbel_softmax(logits[:500], tau=1 / 16).amax(1).mean() > 0.9
    hard = gumbel_softmax(logits[:10].clone().requires_grad_(), tau=0.5, hard=True)
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0} and hard.requires_grad


def test_usage_kl_is_zero_for_even_use_and_log_k_for_one_code():
    """The optional anti-collapse term: KL of the batch's mean posterior to uniform. Positions
    that each pick a different code cost 0 even though each posterior is one-hot (the paper's
    per-position KL charges those ln K each); every position on one code costs ln K."""
    k = 16
    spread = torch.eye(k).view(1, k, 4, 4) * 50.0  # position i is sure of code i
    assert usage_kl(spread).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_uniform(spread).item() == pytest.approx(16 * math.log(k), rel=1e-4)
    same = torch.zeros(1, k, 4, 4)
    same[:, 3] = 50.0
    assert usage_kl(same).item() == pytest.approx(math.log(k), rel=1e-4)
    logits = torch.randn(2, k, 4, 4, requires_grad=True)
    model = DiscreteVAE(dvae_config(**ARCH))
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(0)
    base = elb_terms(model, x, tau=1.0, beta=1.0).loss
    torch.manual_seed(0)
    with_usage = elb_terms(model, x, tau=1.0, beta=1.0, usage_weight=2.0).loss
    assert with_usage.item() > base.item()  # the term is added, non-negative
    usage_kl(logits).backward()
    assert logits.grad.abs().sum() > 0


def test_device_resolution():
    from dalle.errors import ConfigError
    from dalle.train.common import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: cuda"):
            resolve_device("cuda")


def test_random_crop_is_seeded_and_keeps_the_size():
    """dvae.random_crop (off at 1.0): a random square of frac x the side, resized back."""
    from dalle.train.dvae import random_crop

    x = torch.rand(4, 3, 16, 16)
    a = random_crop(x, 0.5, torch.Generator().manual_seed(0))
    b = random_crop(x, 0.5, torch.Generator().manual_seed(0))
    c = random_crop(x, 0.5, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(random_crop(flat, 0.75, torch.Generator()), flat)  # values kept
    ramp = torch.arange(16.0).expand(1, 3, 16, 16).contiguous()  # x = column index
    out = random_crop(ramp, 0.5, torch.Generator().manual_seed(0))
    assert float(out.amax() - out.amin()) < 8.5  # 8 columns stretched over 16: a zoom-in
