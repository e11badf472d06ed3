"""The discrete VAE of DALL-E (paper §2.1, App. A), key-for-key compatible with OpenAI's `dall_e`.

Encoder: 7x7 input conv, `group_count` groups of `n_blk_per_group` resblocks with widths
n_hid * (1, 2, 4, 8, ...), 2x max-pool after every group but the last, then ReLU + 1x1 conv to
`vocab_size` logits. Decoder: 1x1 conv from the (one-hot / relaxed) codes to `n_init`, groups of
widths n_hid * (..., 8, 4, 2, 1) with nearest x2 upsampling after every group but the last, then
ReLU + 1x1 conv to 6 channels (logit-Laplace mu and ln b per colour, App. A.3). The defaults are the
released configuration; state-dict keys and shapes equal the released `encoder.pkl`/`decoder.pkl`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dalle.errors import CheckpointError
from dalle.io import load_checkpoint
from dalle.models.config import as_dict, check_weights, from_dict

LOGIT_LAPLACE_EPS = 0.1  # paper App. A.3: eps = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0,1] -> [eps, 1-eps] (paper App. A.3), so logit(x) stays finite."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_log_prob(x: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """Paper App. A.3 eq. (2): ln f(x|mu,b) = -ln(2b) - ln(x(1-x)) - |logit(x) - mu| / b.

    x: mapped pixels in (0,1) [B, 3, H, W]; mu, ln_b: decoder statistics [B, 3, H, W].
    """
    logit_x = torch.log(x) - torch.log1p(-x)
    return -math.log(2.0) - ln_b - torch.log(x * (1 - x)) - (logit_x - mu).abs() * torch.exp(-ln_b)


class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: parameters `w` [n_out, n_in, kw, kw] and `b` [n_out], same padding."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32)
        if w.device.type != "meta":
            w.normal_(std=1 / math.sqrt(n_in * kw ** 2))  # released init
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros((n_out,), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _Block(nn.Module):
    """Resblock: id_path(x) + (1 / n_layers**2) * res_path(x) (released `post_gain`)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width {n_out} is not a multiple of 4")
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_Block):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__(n_in, n_out, n_layers, (3, 3, 3, 1))  # released encoder kernels


class DecoderBlock(_Block):
    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__(n_in, n_out, n_layers, (1, 3, 3, 3))  # released decoder kernels


class Encoder(nn.Module):
    """x [B, 3, H, W] (mapped pixels) -> logits [B, vocab_size, H/f, W/f], f = 2**(group_count-1)."""

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192) -> None:
        super().__init__()
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        blocks: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(group_count):
            out = n_hid * 2 ** g  # 1, 2, 4, 8 x n_hid
            group: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", EncoderBlock(width if i == 0 else out, out, n_layers)))
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            width = out
        blocks.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(width, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """codes [B, vocab_size, h, w] -> stats [B, 2*output_channels, h*f, w*f] (mu then ln b)."""

    def __init__(self, group_count: int = 4, n_init: int = 128, n_hid: int = 256,
                 n_blk_per_group: int = 2, output_channels: int = 3, vocab_size: int = 8192) -> None:
        super().__init__()
        self.output_channels, self.vocab_size = output_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        blocks: list[tuple[str, nn.Module]] = [("input", Conv2d(vocab_size, n_init, 1))]
        width = n_init
        for g in range(group_count):
            out = n_hid * 2 ** (group_count - 1 - g)  # 8, 4, 2, 1 x n_hid
            group: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", DecoderBlock(width if i == 0 else out, out, n_layers)))
            if g < group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            width = out
        blocks.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(width, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


@dataclass(frozen=True)
class DVAEConfig:
    """The dVAE's architecture (released: 8192 codes, n_hid 256, 2 blocks per group, 4 groups,
    n_init 128; paper App. A) and the image side it was trained at; stored in its checkpoint."""

    vocab_size: int
    n_hid: int
    n_blk_per_group: int
    group_count: int  # downsampling 2**(group_count - 1): 8x at 4 groups
    n_init: int
    dec_n_hid: int
    image_size: int

    def __post_init__(self) -> None:
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the dVAE's "
                             f"downsampling {self.downsample} (group_count {self.group_count})")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


class DiscreteVAE(nn.Module):
    """Encoder + decoder; `state_dict` keys are `encoder.<released>` / `decoder.<released>`."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.group_count, c.n_hid, c.n_blk_per_group, 3, c.vocab_size)
        self.decoder = Decoder(c.group_count, c.n_init, c.dec_n_hid, c.n_blk_per_group, 3,
                               c.vocab_size)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, 3, H, W] in [0,1] -> logits [B, K, H/f, W/f]."""
        return self.encoder(map_pixels(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Argmax codes, no gumbel noise (paper §2.2): [B, 3, H, W] -> long [B, h*w]."""
        return self.logits(images).argmax(dim=1).flatten(1)

    def decode_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: one-hot/relaxed codes [B, K, h, w] -> (mu, ln_b) each [B, 3, H, W]."""
        stats = self.decoder(z).float()
        return stats[:, :3], stats[:, 3:]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens long [B, h*w] -> images [B, 3, H, W] in [0,1]: unmap(sigmoid(mu))."""
        side = int(round(math.sqrt(tokens.shape[1])))
        z = F.one_hot(tokens.view(-1, side, side), self.vocab_size).permute(0, 3, 1, 2).float()
        mu, _ = self.decode_stats(z)
        return unmap_pixels(torch.sigmoid(mu))


def load_dvae(path: str | Path) -> DiscreteVAE:
    """The one loader of a dVAE checkpoint (EMA weights + its stored `DVAEConfig`, validated) ->
    an eval-mode DiscreteVAE."""
    weights, stored, _ = load_checkpoint(path)
    config = from_dict(DVAEConfig, stored, str(path))
    check_weights(DiscreteVAE, config, weights, str(path))
    model = DiscreteVAE(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} does not match the dVAE config: {first}") from None
    return model.eval()


def dvae_config_dict(model: DiscreteVAE) -> dict[str, Any]:
    """What a dVAE checkpoint stores as its config."""
    return as_dict(model.config)
