"""`precision: auto` for each model (dalle.precision): the forward pass whose GEMMs are timed and
the short loss check, at the stage's real shapes, for the prior, the dVAE, the contrastive model
and sampling. Every check runs at the model's initial (or loaded) weights, in eval mode and with
forked RNG, so choosing a precision changes nothing in the training run's random streams. Each
stage hands in its own loss function: this module imports no model or loss module, so the DVC
code dependencies of a stage stay its own.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dalle.precision import Choice, LossCheck, autocast, record_ops, resolve


def choose(requested: str, device: torch.device, stage: str, model: nn.Module,
           forward: Callable[[], Any], loss_check: Optional[LossCheck]) -> Choice:
    """Resolve `requested` for `model`; only `auto` on CPU records the GEMMs of `forward` (and
    times it whole under both autocasts when the GEMMs favour bf16)."""
    if requested != "auto" or device.type != "cpu":
        return resolve(requested, device, stage, [], loss_check)
    was_training = model.training
    model.eval()

    def timed(precision: str) -> None:  # the whole forward pass, as the stage computes it
        with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast(precision, device):
            forward()

    try:
        with torch.random.fork_rng(devices=[]):
            ops = record_ops(forward)
        return resolve(requested, device, stage, ops, loss_check, timed)
    finally:
        model.train(was_training)


def _checked(fn: Callable[[], torch.Tensor], precision: str, device: torch.device) -> float:
    with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast(precision, device):
        torch.manual_seed(0)  # the same noise (gumbel, dropout) in both precisions
        return float(fn())


def noise_images(batch: int, side: int, device: torch.device,
                 fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A fixed batch of uniform images float [B, 3, S, S] in [0, 1]: the GEMM shapes of a real
    batch, from a generator of its own (the training streams are not touched)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, side, side, generator=g).to(device).contiguous(memory_format=fmt)


def for_prior(requested: str, model: nn.Module, batch: tuple[torch.Tensor, ...],
              weights: tuple[float, float], device: torch.device, prior_loss: Callable[..., Any]) -> Choice:
    """batch: text ids [B, T], lengths [B], image tokens [B, N] on `device` (a rank's batch);
    prior_loss: dalle.train.prior_loop.prior_loss."""

    def loss(p: str) -> float:
        return _checked(lambda: prior_loss(model, *batch, weights)[0], p, device)

    return choose(requested, device, "train_prior", model, lambda: model(*batch), loss)


def for_dvae_model(requested: str, model: Any, batch: int, device: torch.device,
                   fmt: torch.memory_format, beta: float, elb_terms: Callable[..., Any]) -> Choice:
    """The dVAE at its training batch and image size (model.config.image_size), τ = 1; elb_terms:
    dalle.train.dvae_loss.elb_terms."""
    images = noise_images(batch, model.config.image_size, device, fmt)  # [B, 3, S, S]

    def loss(p: str) -> float:
        return _checked(lambda: elb_terms(model, images, 1.0, beta).loss, p, device)

    return choose(requested, device, "train_dvae", model, lambda: elb_terms(model, images, 1.0, beta), loss)


def for_clip_model(requested: str, model: Any, batch: int, contrastive_loss: Callable[..., Any]) -> Choice:
    """The contrastive model (CPU) at its batch, image size and text length, captions of random
    ids at full length; contrastive_loss: dalle.models.clip.contrastive_loss."""
    c, cpu = model.config, torch.device("cpu")
    images = noise_images(batch, c.image_size, cpu)  # [B, 3, S, S]
    ids = torch.randint(0, c.vocab_size, (batch, c.text_len), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((batch,), c.text_len)

    def value() -> torch.Tensor:
        return contrastive_loss(model.encode_image(images).float(), model.encode_text(ids, lengths).float(),
                                model.scale())

    return choose(requested, cpu, "train_clip", model, value, lambda p: _checked(value, p, cpu))


def for_sampling(requested: str, model: Any, ids: torch.Tensor, lengths: torch.Tensor,
                 batch: int, sample_image_tokens: Callable[..., torch.Tensor]) -> Choice:
    """The prior decoding `batch` candidates of the first caption (ids [1, T], lengths [1]) with
    dalle.sample.sample_image_tokens; the loss check is the prior's teacher-forced image loss on
    one fp32 sample of it, in both precisions."""
    device = model.head.weight.device
    sample: list[torch.Tensor] = []

    def decode() -> None:
        gen = torch.Generator().manual_seed(0)
        sample.append(sample_image_tokens(model, ids, lengths, batch, generator=gen, batch_size=batch))

    def loss(p: str) -> float:
        if not sample:
            decode()
        text, n = ids.repeat(batch, 1).to(device), lengths.repeat(batch).to(device)

        def image_loss() -> torch.Tensor:
            image_logits = model(text, n, sample[0])[1]  # fp32 [B, N, Vi]
            return F.cross_entropy(image_logits.flatten(0, 1), sample[0].flatten())

        return _checked(image_loss, p, device)

    return choose(requested, device, "generate", model, decode, loss)
