"""dVAE architecture against the released `dall_e` modules and the paper's likelihood (App. A.3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dalle.errors import DataError
from dalle.models.dvae import (Decoder, DiscreteVAE, Encoder, logit_laplace_log_prob, map_pixels,
                               unmap_pixels)
from dalle.pixels import as_rgb_uint8
from tests.helpers import dvae_config

SMALL = dvae_config()


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_param_counts_at_released_defaults():
    with torch.device("meta"):
        enc, dec = Encoder(), Decoder()
    assert _count(enc) == 53_786_240
    assert _count(dec) == 43_829_766


def test_state_dict_keys_and_shapes_equal_released():
    dall_e = pytest.importorskip("dall_e")
    with torch.device("meta"):
        pairs = [(Encoder(), dall_e.Encoder()), (Decoder(), dall_e.Decoder())]
    for ours, theirs in pairs:
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
               {k: v.shape for k, v in theirs.state_dict().items()}
    assert "blocks.group_1.block_1.res_path.conv_1.w" in pairs[0][0].state_dict()
    assert "blocks.group_2.block_1.id_path.w" in pairs[0][0].state_dict()
    assert "blocks.output.conv.w" in pairs[1][0].state_dict()


def test_same_outputs_as_dall_e_with_same_weights():
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    theirs_e = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    theirs_d = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    ours_e = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    ours_d = Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    ours_e.load_state_dict(theirs_e.state_dict())
    ours_d.load_state_dict(theirs_d.state_dict())
    x = map_pixels(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        logits = ours_e(x)
        torch.testing.assert_close(logits, theirs_e(x), rtol=0, atol=0)
        z = torch.softmax(logits, 1)
        torch.testing.assert_close(ours_d(z), theirs_d(z), rtol=0, atol=0)


def test_small_config_shapes_and_downsampling():
    model = DiscreteVAE(SMALL)
    x = torch.rand(2, 3, 32, 32)  # [B, 3, H, W]
    logits = model.logits(x)
    assert logits.shape == (2, 64, 4, 4)  # 8x downsampling at 4 groups
    codes = model.encode(x)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    rec = model.decode(codes)
    assert rec.shape == (2, 3, 32, 32) and 0 <= rec.min() and rec.max() <= 1


def test_resblock_post_gain_is_one_over_n_layers_squared():
    enc = Encoder(group_count=3, n_hid=16, n_blk_per_group=2, vocab_size=32)
    assert enc.blocks.group_1.block_1.post_gain == pytest.approx(1 / 36)


def test_pixel_map_round_trip_and_range():
    x = torch.rand(1000)
    y = map_pixels(x)
    assert y.min() >= 0.1 and y.max() <= 0.9  # eps = 0.1
    torch.testing.assert_close(unmap_pixels(y), x)


def test_logit_laplace_is_a_density_on_unit_interval():
    # paper App. A.3: f(x|mu,b) integrates to 1 over (0, 1) for any mu, b
    x = torch.linspace(1e-6, 1 - 1e-6, 400_001, dtype=torch.float64)
    for mu, ln_b in ((0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)):
        p = logit_laplace_log_prob(x, torch.tensor(mu, dtype=torch.float64),
                                   torch.tensor(ln_b, dtype=torch.float64)).exp()
        assert torch.trapezoid(p, x).item() == pytest.approx(1.0, abs=2e-3)


def test_logit_laplace_peaks_at_sigmoid_mu():
    x = torch.linspace(0.01, 0.99, 9999)
    lp = logit_laplace_log_prob(x, torch.tensor(0.7), torch.tensor(-3.0))
    assert x[lp.argmax()].item() == pytest.approx(1 / (1 + math.exp(-0.7)), abs=1e-3)


def test_images_grey_and_rgba_converted_and_resized(caplog):
    grey = np.zeros((2, 16, 16), np.uint8)
    out = as_rgb_uint8(grey, 32, "val")
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    rgba = np.full((1, 32, 32, 4), 200, np.uint8)
    assert as_rgb_uint8(rgba, 32, "val").shape == (1, 32, 32, 3)
    assert "RGB" in caplog.text and "resizing" in caplog.text


@pytest.mark.parametrize("bad", [np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 2), np.uint8),
                                 np.zeros((8, 8), np.uint8)])
def test_images_bad_dtype_or_channels_refused(bad):
    with pytest.raises(DataError, match="images have"):
        as_rgb_uint8(bad, 8, "train")
