"""Giving freed heap memory back to the system between units of work.

glibc keeps memory freed by numpy/torch/PIL in its heap (and raises its mmap threshold after the
first large free, so later batch-sized buffers land there too). A stage that decodes one shard
after another then sees its RSS creep by tens of MB per shard before it levels off, which would
read as memory growing with the collection. `trim()` after each shard returns those pages
(`malloc_trim(0)`, ~1 ms); on a C library without it, it does nothing.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Callable, Optional


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:  # the C library already loaded in this process (no subprocess to find it)
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim() -> None:
    """Return the heap's free pages to the system (glibc), else nothing."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
