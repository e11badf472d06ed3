"""The streaming order (dalle.data.stream.EpochOrder): every sample once per epoch, ranks
disjoint, a function of (seed, epoch) alone, resumable at any step; and filters."""
from __future__ import annotations

import itertools

import pytest

from dalle.data.filters import Row, build
from dalle.data.stream import EpochOrder
from dalle.errors import ConfigError
from tests.helpers import section


@pytest.mark.parametrize("n,chunk,world", [(100, 7, 1), (100, 7, 2), (1000, 64, 3), (5, 100, 2)])
def test_an_epoch_covers_every_sample_once_and_ranks_are_disjoint(n: int, chunk: int, world: int) -> None:
    for epoch in (0, 1):
        parts = [EpochOrder(n, chunk, seed=3, rank=r, world=world).epoch(epoch).tolist()
                 for r in range(world)]
        every = [i for p in parts for i in p]
        assert sorted(every) == list(range(n))  # nothing twice, nothing skipped
        if world > 1:
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 2 * chunk
    order = EpochOrder(n, chunk, seed=3)
    first = order.epoch(0).tolist()
    assert first == EpochOrder(n, chunk, seed=3).epoch(0).tolist()  # (seed, epoch) decide
    assert first != order.epoch(1).tolist() and first != EpochOrder(n, chunk, 4).epoch(0).tolist()


def test_batches_resume_at_any_step_exactly() -> None:
    order = EpochOrder(50, 8, seed=1, rank=1, world=2)
    straight = list(itertools.islice(order.batches(6), 20))  # crosses several epochs
    for step in (0, 3, 4, 11):
        resumed = list(itertools.islice(order.batches(6, start=step * 6), 20 - step))
        assert resumed == straight[step:], step
    seen = [i for b in straight[:4] for i in b]  # the first epoch of rank 1: 25 samples
    assert len(set(seen[:len(order.epoch(0))])) == len(order.epoch(0))


def test_chunks_keep_locality() -> None:
    """A chunk's samples stay together: consecutive draws come from a few shards at a time."""
    order = EpochOrder(1000, 100, seed=0).epoch(0).tolist()
    blocks = [len({i // 100 for i in order[s:s + 100]}) for s in range(0, 1000, 100)]
    assert blocks == [1] * 10


FILTERS = dict(caption_words=[2, 6], boilerplate=["^\\W*(image|photo)\\W*$", "stock photo"],
               min_side=64, max_aspect=2.0, language=None)


@pytest.mark.parametrize("row,reason", [
    (Row("a red circle", 640, 480), None),
    (Row("", 640, 480), "empty_caption"),
    (Row("circle", 640, 480), "caption_length"),
    (Row("one two three four five six seven", 640, 480), "caption_length"),
    (Row("Photo!", 640, 480), "caption_length"),
    (Row("a nice stock photo here", 640, 480), "boilerplate"),
    (Row("a red circle", 640, 40), "min_side"),
    (Row("a red circle", 1000, 400), "aspect"),
    (Row("a red circle", 400, 200), None),  # exactly 2:1 is kept
    (Row("a red circle", 0, 0), None),  # size unknown: not judged
])
def test_filters_name_the_reason(row: Row, reason: str) -> None:
    assert build(section("prepare").filters.model_validate(FILTERS), 256)(row) == reason


def test_bad_filter_settings_are_one_line() -> None:
    cfg = section("prepare").filters.model_validate({**FILTERS, "boilerplate": ["(unclosed"]})
    with pytest.raises(ConfigError, match="is not a regular expression"):
        build(cfg, 256)
    with pytest.raises(Exception, match="caption_words"):
        section("prepare").filters.model_validate({**FILTERS, "caption_words": [5, 2]})


@pytest.mark.parametrize("caption,reason", [
    ("photographed on 12/03/2009", "boilerplate"), ("Taken in July 2011.", "boilerplate"),
    ("IMG_1234", "boilerplate"), ("untitled", "boilerplate"), ("", "empty_caption"),
    ("a dog photographed on a beach", None), ("a red circle above a blue square", None),
])
def test_the_default_filters_remove_web_boilerplate(caption: str, reason: str | None) -> None:
    """params.yaml's own patterns (docs/decisions.md, "Data at scale"), not a test's."""
    assert build(section("prepare").filters, 64)(Row(caption, 300, 300)) == reason


def test_the_offline_language_filter_keeps_english_only() -> None:
    """prepare.filters.language: en with langid (no download; its model is in the package)."""
    pytest.importorskip("langid", reason="the dev extra installs langid")
    keep = build(section("prepare").filters.model_validate(
        {**FILTERS, "caption_words": [1, 20], "language": "en"}), 256)
    assert keep(Row("a small dog running on the beach", 640, 480)) is None
    assert keep(Row("ein kleiner Hund läuft am Strand", 640, 480)) == "language"
    assert keep(Row("un petit chien qui court sur la plage", 640, 480)) == "language"
