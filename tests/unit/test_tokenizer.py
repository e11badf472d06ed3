"""BPE tokenizer (paper §2.2): lower-cased BPE, dropout only on request, -1 padding, truncation."""
from __future__ import annotations

import logging

import pytest
import torch

from dalle.data.tokenizer import BPETokenizer, build
from dalle.errors import CheckpointError

TEXTS = [f"a {s} {c} {sh} {p}" for s in ("small", "large") for c in ("red", "green", "blue")
         for sh in ("circle", "square", "triangle") for p in ("on the left", "at the top")] * 3


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer(build(96, 2, TEXTS), dropout=0.1)


def test_vocab_lowercase_and_roundtrip(tok):
    assert 20 < tok.vocab_size <= 96
    assert tok.encode(["A Small RED Circle"]) == tok.encode(["a small red circle"])
    assert tok.decode(tok.encode(["a large blue triangle at the top"])[0]) == "a large blue triangle at the top"
    unseen = tok.encode(["a ✓ circle"])[0]  # unseen characters map to [UNK], never fail
    assert 0 in unseen


def test_dropout_only_when_asked(tok):
    text = ["a large green triangle on the left"] * 64
    plain = tok.encode(text)
    assert all(ids == plain[0] for ids in plain)  # deterministic when off
    assert tok.encode(text) == plain
    dropped = tok.encode(text, dropout=True)
    assert len({tuple(x) for x in dropped}) > 1  # BPE dropout varies the segmentation
    assert all(tok.decode(x) == text[0] for x in dropped)
    assert tok.encode(text) == plain  # and did not leak into the deterministic instance


def test_encode_padded(tok, caplog):
    ids, lengths = tok.encode_padded(["a red circle", "a large blue triangle at the top"], 6)
    assert ids.dtype == torch.int64 and ids.shape == (2, 6) and lengths.dtype == torch.int64
    n0 = len(tok.encode(["a red circle"])[0])
    assert lengths[0] == n0 and (ids[0, n0:] == -1).all() and (ids[0, :n0] >= 0).all()
    with caplog.at_level(logging.WARNING):
        ids, lengths = tok.encode_padded(["a large blue triangle at the top"], 3)
    assert lengths.tolist() == [3] and (ids >= 0).all() and "truncated" in caplog.text
    assert tok.decode(torch.tensor([ids[0, 0].item(), -1, -1])) == tok.decode([ids[0, 0].item()])


def test_save_load_and_bad_file(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(path)
    assert again.encode(TEXTS[:5]) == tok.encode(TEXTS[:5]) and again.vocab_size == tok.vocab_size
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json"):
        BPETokenizer.load(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="missing.json"):
        BPETokenizer.load(tmp_path / "missing.json")
