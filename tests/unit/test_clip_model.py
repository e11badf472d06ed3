"""The contrastive model (paper §2.6): shapes, normalisation, InfoNCE, padding, checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dalle.data.dedup import clip_embedder
from dalle.errors import CheckpointError, DataError
from dalle.io import save_checkpoint
from dalle.models.clip import ContrastiveModel, clip_config_dict, contrastive_loss, load_clip
from dalle.pixels import to_float
from tests.helpers import clip_config

CFG = clip_config()


def _batch(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 16, 16, generator=g)  # [B, 3, S, S]
    lengths = torch.randint(1, 9, (b,), generator=g)  # [B]
    ids = torch.randint(0, 40, (b, 8), generator=g)
    ids[torch.arange(8)[None] >= lengths[:, None]] = -1  # pad -1 past the caption
    return images, ids, lengths


def test_embeddings_are_normalised_with_expected_shapes():
    torch.manual_seed(0)
    model = ContrastiveModel(CFG)
    images, ids, lengths = _batch()
    img, txt = model.encode_image(images), model.encode_text(ids, lengths)
    assert img.shape == (6, 16) and txt.shape == (6, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(6), atol=1e-5)
    # other image sizes are resized to the model's
    assert model.encode_image(torch.rand(2, 3, 24, 24)).shape == (2, 16)


def test_padding_positions_do_not_change_the_text_embedding():
    torch.manual_seed(0)
    model = ContrastiveModel(CFG).eval()
    _, ids, lengths = _batch()
    other = ids.clone()
    other[torch.arange(8)[None] >= lengths[:, None]] = 7  # garbage after the caption
    assert torch.allclose(model.encode_text(ids, lengths), model.encode_text(other, lengths), atol=1e-5)


def test_infonce_is_symmetric_and_log_b_at_chance():
    b = 5
    same = torch.nn.functional.normalize(torch.ones(b, 4), dim=-1)
    loss = contrastive_loss(same, same, torch.tensor(10.0))
    assert float(loss) == pytest.approx(math.log(b), rel=1e-5)  # all logits equal: chance
    img = torch.nn.functional.normalize(torch.randn(b, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(b, 4), dim=-1)
    assert float(contrastive_loss(img, txt, torch.tensor(3.0))) == pytest.approx(
        float(contrastive_loss(txt, img, torch.tensor(3.0))), rel=1e-6)
    eye = torch.eye(b)
    assert float(contrastive_loss(eye, eye, torch.tensor(100.0))) < 1e-3  # perfect pairs


def test_training_matches_pairs_and_learns_the_temperature():
    torch.manual_seed(0)
    model = ContrastiveModel(CFG)
    images, ids, lengths = _batch(8, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    scale0 = model.scale().item()
    first = None
    for _ in range(60):
        loss = contrastive_loss(model.encode_image(images), model.encode_text(ids, lengths), model.scale())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
        opt.step()
    assert loss.item() < 0.3 * first
    assert model.scale().item() != pytest.approx(scale0)
    sims = model.encode_text(ids, lengths) @ model.encode_image(images).t()
    assert (sims.argmax(1) == torch.arange(8)).float().mean() == 1.0


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    model = ContrastiveModel(CFG).eval()
    path = save_checkpoint(tmp_path / "clip.safetensors", model.state_dict(), clip_config_dict(model))
    loaded = load_clip(path)
    assert loaded.config == CFG
    images = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    want = model.encode_image(to_float(images)).detach().numpy()
    emb = clip_embedder(path)(images)  # the dedup stage's hook (paper §3.2)
    assert emb.shape == (3, 16) and emb.dtype == np.float32 and np.allclose(emb, want, atol=1e-5)
    other = ContrastiveModel(clip_config(image_width=16))
    bad = save_checkpoint(tmp_path / "bad.safetensors", other.state_dict(), clip_config_dict(model))
    with pytest.raises(CheckpointError, match=r"stored config: tensor 'visual.body.0.weight' is \[16, 3"):
        load_clip(bad)
    not_clip = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {"n": 1})
    with pytest.raises(CheckpointError, match="stored model config lacks 'embed_dim'"):
        load_clip(not_clip)


def test_images_must_be_uint8_rgb():
    with pytest.raises(DataError, match="expected uint8 images"):
        to_float(np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(DataError, match="expected uint8 images"):
        to_float(np.zeros((2, 16, 16, 3), np.float32))
