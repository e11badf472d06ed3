"""The prior's stream (paper §2.2): [text | start-of-image | image], the start-of-image position
predicting the first image token whatever the caption's length."""
from __future__ import annotations

import torch

from dalle.models.transformer import DalleTransformer
from dalle.sample import sample_image_tokens
from tests.helpers import prior_config


def _model() -> DalleTransformer:
    torch.manual_seed(0)
    return DalleTransformer(prior_config(n_layers=2)).eval()


def test_the_start_of_image_token_sits_between_text_and_image() -> None:
    model = _model()
    t = model.text_len
    text = torch.randint(0, 40, (3, t))
    lengths = torch.tensor([2, 5, t])  # the last caption fills every text position
    prefix = model.embed_prefix(text, lengths)  # [3, T + 1, D]
    assert prefix.shape[1] == t + 1 == model.image_start
    for row in prefix[:, t]:
        torch.testing.assert_close(row, model.soi.weight[0])  # the same learned token for every caption
    image = torch.randint(0, 24, (3, 16))
    assert model.hidden(text, lengths, image[:, :5]).shape[1] == t + 1 + 5
    assert model.seq_len == t + 1 + 16


def test_image_token_0_is_predicted_from_the_start_of_image_position() -> None:
    """For a caption that fills every text position too: its last word is no longer the position
    that predicts the image (before, image logits[0] came from the last text position)."""
    model = _model()
    t = model.text_len
    text, lengths = torch.randint(0, 40, (2, t)), torch.tensor([t, 3])
    image = torch.randint(0, 24, (2, 16))
    with torch.no_grad():
        text_logits, image_logits = model(text, lengths, image)
        h = model.hidden(text, lengths, image[:, :0])  # the prefix alone: [2, T + 1, D]
        torch.testing.assert_close(image_logits[:, 0], model.image_logits(h[:, t]))
        model.soi.weight.add_(torch.randn(model.soi.weight.shape))  # (a constant: LayerNorm removes it)
        moved_text, moved_image = model(text, lengths, image)
    torch.testing.assert_close(moved_text, text_logits)  # text never sees the token after it
    assert (moved_image[:, 0] - image_logits[:, 0]).abs().max() > 1e-3


def test_cached_sampling_starts_after_the_start_of_image_token() -> None:
    model = _model()
    text, lengths = torch.randint(0, 40, (2, model.text_len)), torch.tensor([model.text_len, 2])
    draws = [sample_image_tokens(model, text, lengths, 2, generator=torch.Generator().manual_seed(1),
                                 cached=cached) for cached in (True, False)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (4, 16)
