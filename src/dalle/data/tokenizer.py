"""The caption tokenizer (paper §2.2): BPE over lower-cased captions, with BPE dropout in training.

Trained with HuggingFace `tokenizers` on the train split's captions (NFKC + lower case,
sentencepiece-style Metaspace pre-tokenizer, `[UNK]` for characters never seen) and saved to
the models directory (`Artefacts.tokenizer`). `BPETokenizer` keeps two instances of the same model: a
deterministic one and one with BPE dropout (paper §2.2 fn. 5: rate 0.1) used only when
`encode(..., dropout=True)`, so switching never mutates shared state (thread-safe).
Padding is not a token: `encode_padded` fills with -1 and the prior learns one pad embedding
per position (paper §2.2).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle.catalog import Artefacts
from dalle.config_sections import Tokenizer as TokenizerCfg
from dalle.data.reader import read_manifest
from dalle.errors import CheckpointError, DataError
from dalle.io import atomic_path, write_json
from dalle.stage import Out, StageSpec

log = logging.getLogger(__name__)
UNK = "[UNK]"
PAD_ID = -1


def build(vocab_size: int, min_frequency: int, texts: Iterable[str]) -> Tokenizer:
    """Train a BPE tokenizer of at most `vocab_size` tokens on `texts`."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[UNK], show_progress=False)
    tok.train_from_iterator((t.lower() for t in texts), trainer=trainer)
    return tok


class BPETokenizer:
    """Wrapper over a trained `tokenizers` BPE model (deterministic + dropout instances)."""

    def __init__(self, tokenizer: Tokenizer, dropout: float = 0.1) -> None:
        self._det = tokenizer
        spec = json.loads(tokenizer.to_str())
        spec["model"]["dropout"] = dropout if dropout > 0 else None
        self._drop = Tokenizer.from_str(json.dumps(spec))
        self.dropout = dropout

    @classmethod
    def load(cls, path: str | Path, dropout: float = 0.1) -> "BPETokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)), dropout)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise CheckpointError(f"{path} is not a tokenizer file ({str(exc).splitlines()[0]}); "
                                  "run the tokenizer stage") from None

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self._det.save(str(tmp))
        return Path(path)

    @property
    def vocab_size(self) -> int:
        return self._det.get_vocab_size()

    def encode(self, texts: Sequence[str], dropout: bool = False) -> list[list[int]]:
        """Token ids per text; BPE dropout only when `dropout` (training), else deterministic."""
        tok = self._drop if dropout and self.dropout > 0 else self._det
        return [e.ids for e in tok.encode_batch(list(texts))]

    def encode_padded(self, texts: Sequence[str], text_len: int,
                      dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [B, text_len] (pad -1) and lengths int64 [B]; longer texts are truncated."""
        ids = self.encode(texts, dropout)
        out = np.full((len(ids), text_len), PAD_ID, dtype=np.int64)  # [B, T]
        lengths = np.array([min(len(x), text_len) for x in ids], dtype=np.int64)  # [B]
        for row, seq in enumerate(ids):
            out[row, :lengths[row]] = seq[:text_len]
        cut = sum(len(x) > text_len for x in ids)
        if cut:
            log.warning("%d of %d captions are longer than text_len %d tokens and were truncated",
                        cut, len(ids), text_len)
        return torch.from_numpy(out), torch.from_numpy(lengths)

    def decode(self, ids: Any) -> str:
        """Text of one id sequence (list, array or tensor); pad ids (< 0) are skipped."""
        seq = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._det.decode([int(i) for i in seq if int(i) >= 0])


def load_tokenizer(path: str | Path, dropout: float = 0.1) -> BPETokenizer:
    """The trained tokenizer at `path` (the tokenizer stage's output), or one line saying so."""
    if not Path(path).is_file():
        raise DataError(f"tokenizer not found: {path}; run the tokenizer stage first "
                        "(dvc repro tokenizer)")
    return BPETokenizer.load(path, dropout)


def tokenize(tokenizer: BPETokenizer, captions: Sequence[str], text_len: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ids int64 [N, text_len] (pad -1) and lengths int64 [N] (at least 1), without
    BPE dropout: what the contrastive model and the samplers read."""
    ids, lengths = tokenizer.encode_padded(list(captions), text_len, dropout=False)
    return ids.long(), lengths.long().clamp(min=1)


def train_tokenizer(art: Artefacts, tracker: Any, tokenizer: TokenizerCfg) -> dict[str, Any]:
    """The stage body: train captions -> the BPE tokenizer + metrics."""
    cfg = tokenizer
    rows = read_manifest(art)
    texts = [str(c) for c in rows.loc[rows["split"] == "train", "caption"] if str(c).strip()]
    if not texts:
        raise DataError(f"no train captions in {art.clean_manifest}; nothing to train the "
                        "tokenizer on")
    tok = BPETokenizer(build(cfg.vocab_size, cfg.min_frequency, texts), cfg.bpe_dropout)
    path = tok.save(art.tokenizer)
    lengths = [len(x) for x in tok.encode(texts)]
    metrics = {"vocab_size": tok.vocab_size, "captions": len(texts),
               "mean_tokens": round(float(np.mean(lengths)), 3), "max_tokens": int(max(lengths)),
               "truncated": int(sum(n > cfg.text_len for n in lengths))}
    write_json(art.metrics("tokenizer"), metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(path, "tokenizer")
    return metrics


STAGE = StageSpec(
    name="tokenizer", fn=train_tokenizer, params=("tokenizer",),
    inputs=lambda a: (a.clean,),
    outputs=lambda a: (Out(a.tokenizer), Out(a.metrics("tokenizer"), metric=True)),
    summary="lower-cased BPE on the train captions (§2.2)",
)
