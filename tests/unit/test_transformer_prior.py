"""The prior's structure against paper §2.2 / App. B.1 (shapes, causality, padding, size)."""
from __future__ import annotations

from pathlib import Path

import torch

from dalle.config import load_params
from dalle.models.config import from_section
from dalle.models.transformer import DalleTransformer, PriorConfig, count_parameters
from dalle.train.common import param_groups
from dalle.train.prior_loop import lr_at, make_optimizer, prior_loss
from tests.helpers import prior_config

REPO = Path(__file__).resolve().parents[2]


def tiny(attention: str = "sparse") -> DalleTransformer:
    torch.manual_seed(0)
    return DalleTransformer(prior_config(n_layers=4, attention=attention))


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (3, 6), generator=g)
    lengths = torch.tensor([2, 6, 4])
    ids[torch.arange(6)[None] >= lengths[:, None]] = -1
    return ids, lengths, torch.randint(0, 24, (3, 16), generator=g)


def test_shapes_and_vocab_split() -> None:
    m = tiny()
    t, lengths, img = batch()
    text_logits, image_logits = m(t, lengths, img)
    assert text_logits.shape == (3, 5, 40) and image_logits.shape == (3, 16, 24)  # text / image vocab only
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 4


def test_image_prediction_is_causal() -> None:
    m = tiny().eval()
    t, lengths, img = batch()
    _, a = m(t, lengths, img)
    img2 = img.clone()
    img2[:, 9:] = (img2[:, 9:] + 1) % 24  # change image tokens 9.. -> outputs predicting 0..9 unchanged
    _, b = m(t, lengths, img2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_padding_uses_learned_tokens_not_the_ids() -> None:
    m = tiny().eval()
    t, lengths, img = batch()
    t2 = t.clone()
    t2[0, 2:] = 7  # ids past the caption length are ignored: per-position pad tokens are used
    torch.testing.assert_close(m(t, lengths, img)[1], m(t2, lengths, img)[1])
    longer = lengths.clone()
    longer[0] = 3
    assert not torch.allclose(m(t2, lengths, img)[1][0], m(t2, longer, img)[1][0])


def test_loss_weights_and_gradients() -> None:
    m = tiny()
    t, lengths, img = batch()
    loss, stats = prior_loss(m, t, lengths, img, (1 / 8, 7 / 8))
    assert abs(stats["loss"] - (stats["loss_text"] / 8 + 7 * stats["loss_image"] / 8)) < 1e-5
    assert stats["text_tokens"] == (2 - 1) + (6 - 1) + (4 - 1)  # only real caption tokens are targets
    loss.backward()
    assert all(p.grad is not None for p in m.blocks.parameters())


def test_weight_decay_groups_and_schedule() -> None:
    m = tiny()
    decay, no_decay = param_groups(m, 0.045)
    linear = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear  # the one rule = Linear weights in the prior
    ids = {id(p) for p in no_decay["params"]}
    assert id(m.text_emb.weight) in ids and id(m.blocks[0].ln1.weight) in ids and id(m.head.bias) in ids
    cfg = load_params(REPO / "params.yaml").prior
    opt = make_optimizer(m, cfg)
    assert opt.defaults["betas"] == (0.9, 0.96)
    assert lr_at(0, cfg) < lr_at(cfg.warmup_steps, cfg) == cfg.lr
    assert abs(lr_at(cfg.steps, cfg) - cfg.lr * cfg.lr_final_frac) < 1e-12


def test_paper_preset_is_12_billion_on_meta() -> None:
    p = load_params(REPO / "params.yaml", "paper-12b")
    config = from_section(PriorConfig, p.prior, text_vocab=p.tokenizer.vocab_size,
                          text_len=p.tokenizer.text_len, image_vocab=p.dvae.vocab_size, grid=32)
    with torch.device("meta"):
        m = DalleTransformer(config)
    total, blocks = count_parameters(m)
    print(f"paper-12b: total {total / 1e9:.3f}B, non-embedding (resblocks) {blocks / 1e9:.3f}B")
    assert abs(blocks - 12.0e9) <= 0.1e9  # paper Table 1: 12 * 64 * d² counted, embeddings excluded
    assert m.kinds[:4] == ["row", "column", "row", "row"] and m.kinds[-1] == "conv"
