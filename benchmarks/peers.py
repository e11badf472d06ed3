"""The benchmark shapes and the three contenders built at the same shape.

* `dalle`: this project's prior (`dalle.models.transformer.DalleTransformer`), from params.yaml;
* `dalle-pytorch`: lucidrains' DALLE-pytorch 1.6.6 with its closest attention settings: per layer
  axial_row, axial_col on layers with (i-2) mod 4 = 0 (paper B.1, 1-based i), conv_like last;
  rotary embeddings and token shifting off (the paper has neither), fp32;
* `gpt2-hf`: Hugging Face GPT-2 at the same width, depth, heads, sequence length and vocabulary
  (dense causal attention through SDPA): a well-optimised dense baseline.
Only the peers venv has the peers; every builder raises ImportError when its package is absent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import quick

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    text_len: int
    grid: int
    d_model: int
    n_layers: int
    n_heads: int
    text_vocab: int
    image_vocab: int
    batch: int  # training batch (captions); sampling always uses 8 captions
    conv_kernel: int = 5

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    def train_flops_per_token(self) -> float:
        """Model FLOPs per trained token, same formula for every contender (PaLM appendix B):
        6 x (12 d^2 per layer + d x output vocabulary) + 12 x layers x d x seq (dense attention)."""
        n = self.n_layers * 12 * self.d_model**2 + self.d_model * (self.text_vocab + self.image_vocab)
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * self.seq_len


def section(name: str) -> Any:
    """One validated section of params.yaml (only the sections a benchmark reads are validated)."""
    import yaml
    from dalle import config_sections

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cls = {"prior": config_sections.Prior, "dvae": config_sections.DVAE}.get(name)
    return cls.model_validate(raw[name]) if cls else SimpleNamespace(**raw[name])


def default_shape() -> Shape:
    """The embedded default of params.yaml: tokenizer text_len, dVAE grid and vocab, prior size."""
    prior, dvae, tok = section("prior"), section("dvae"), section("tokenizer")
    grid = section("data").image_size // 2 ** (dvae.group_count - 1)
    return Shape("default", tok.text_len, grid, prior.d_model, prior.n_layers, prior.n_heads,
                 tok.vocab_size, dvae.vocab_size, prior.batch_size, prior.conv_kernel)


def shapes() -> list[Shape]:
    """The embedded default and the paper-shaped reduced config (256 text + 32x32 image tokens,
    d_model 512, 8 layers, 8 heads of 64, the paper's vocabularies 16384 / 8192, paper's 11x11 conv)."""
    paper = Shape("paper-shaped", 256, 32, 512, 8, 8, 16384, 8192, batch=2, conv_kernel=11)
    if quick():
        return [Shape("quick", 8, 4, 64, 2, 2, 64, 32, batch=2, conv_kernel=3)]
    only = [c for c in os.environ.get("BENCH_CASES", "").split(",") if c]  # e.g. BENCH_CASES=paper-shaped
    return [s for s in (default_shape(), paper) if not only or s.name in only]


def random_batch(shape: Shape, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens [B, text_len] in 1..text_vocab-1 (0 is DALLE-pytorch's pad) and image tokens
    [B, image_len] in 0..image_vocab-1."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, shape.text_vocab, (batch, shape.text_len), generator=g)
    image = torch.randint(0, shape.image_vocab, (batch, shape.image_len), generator=g)
    return text, image


def dalle_pytorch_attn_types(n_layers: int) -> tuple[str, ...]:
    """Paper B.1 layer pattern in DALLE-pytorch's names: column attention where (i-2) mod 4 = 0
    (1-based), the convolutional mask on the last layer, row attention elsewhere."""
    return tuple("conv_like" if i == n_layers else "axial_col" if (i - 2) % 4 == 0 else "axial_row"
                 for i in range(1, n_layers + 1))


def build_dalle_pytorch(shape: Shape) -> torch.nn.Module:
    from dalle_pytorch import DALLE, DiscreteVAE

    # the VAE is only needed to tell DALLE the grid (image_size / 2^num_layers) and the vocabulary
    vae = DiscreteVAE(image_size=shape.grid * 8, num_layers=3, num_tokens=shape.image_vocab,
                      codebook_dim=64, hidden_dim=16)
    return DALLE(dim=shape.d_model, vae=vae, num_text_tokens=shape.text_vocab,
                 text_seq_len=shape.text_len, depth=shape.n_layers, heads=shape.n_heads,
                 dim_head=shape.d_model // shape.n_heads,
                 attn_types=dalle_pytorch_attn_types(shape.n_layers),
                 rotary_emb=False, shift_tokens=False, loss_img_weight=7)


def build_gpt2(shape: Shape) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=shape.text_vocab + shape.image_vocab, n_positions=shape.seq_len,
                     n_embd=shape.d_model, n_layer=shape.n_layers, n_head=shape.n_heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.generation_config.eos_token_id = None
    return model


def build_ours(shape: Shape) -> torch.nn.Module:
    from dalle.models.config import from_section
    from dalle.models.transformer import DalleTransformer, PriorConfig

    prior = section("prior").model_copy(update={
        "d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
        "conv_kernel": shape.conv_kernel, "dropout": 0.0, "checkpointing": False})
    return DalleTransformer(from_section(PriorConfig, prior, text_vocab=shape.text_vocab,
                                         text_len=shape.text_len, image_vocab=shape.image_vocab,
                                         grid=shape.grid))


def preimport() -> None:
    """Import every contender's package up front, so peak-RSS deltas measure models, not imports."""
    for name in ("dalle_pytorch", "transformers", "dalle.models.transformer", "dalle.models.dvae",
                 "dalle.sample", "dalle.train.prior_loop", "dalle.train.dvae_loss"):
        try:
            __import__(name)
        except ImportError:
            pass
