"""Filters for web data, applied by the prepare stage before a collection reaches the dVAE.

Each filter looks at one clean row (its caption, and the size the image had before collect
resized it) and returns the reason it drops the row, or None. The reasons become the stage's
`removed_<reason>` metrics. docs/decisions.md ("Data") says what the paper reports of its own
filtering and what these defaults are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from dalle.config_sections import Filters
from dalle.errors import ConfigError


@dataclass(frozen=True)
class Row:
    """What a filter sees of one sample."""

    caption: str
    width: int  # of the image as found, before collect resized it
    height: int


Check = Callable[[Row], Optional[str]]


def _caption_length(cfg: Filters) -> Check:
    low, high = cfg.caption_words

    def check(row: Row) -> Optional[str]:
        words = len(row.caption.split())
        if words == 0:
            return "empty_caption"
        return None if low <= words <= high else "caption_length"
    return check


def _boilerplate(cfg: Filters) -> Check:
    try:
        patterns = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate]
    except re.error as exc:
        raise ConfigError(f"prepare.filters.boilerplate: {exc.pattern!r} is not a regular "
                          f"expression ({exc})") from None

    def check(row: Row) -> Optional[str]:
        return "boilerplate" if any(p.search(row.caption) for p in patterns) else None
    return check


def _geometry(cfg: Filters, image_size: int) -> Check:
    min_side = min(cfg.min_side, image_size)  # an image at the training size is never too small

    def check(row: Row) -> Optional[str]:
        short, long = sorted((row.width, row.height))
        if short <= 0:
            return None  # size unknown: nothing to judge
        if short < min_side:
            return "min_side"
        return "aspect" if long / short > cfg.max_aspect else None
    return check


def _language(cfg: Filters) -> Optional[Check]:
    if cfg.language is None:
        return None
    try:
        import langid  # optional: `pip install 'dalle[lang]'`; its model ships in the package
    except ImportError:
        raise ConfigError("prepare.filters.language needs the offline language identifier "
                          "`langid`: pip install 'dalle[lang]' (or set it to null)") from None
    wanted = cfg.language

    def check(row: Row) -> Optional[str]:
        return None if langid.classify(row.caption)[0] == wanted else "language"
    return check


def build(cfg: Filters, image_size: int) -> Callable[[Row], Optional[str]]:
    """One function: the first reason a row is dropped for, or None to keep it."""
    checks = [c for c in (_caption_length(cfg), _boilerplate(cfg), _geometry(cfg, image_size),
                          _language(cfg)) if c is not None]

    def reason(row: Row) -> Optional[str]:
        for check in checks:
            why = check(row)
            if why is not None:
                return why
        return None
    return reason
