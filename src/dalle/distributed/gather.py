"""Small collectives for stages that split their work by shard across Horovod ranks.

A single process (no HOROVOD_RANK) never imports horovod: every function is then the identity.
"""
from __future__ import annotations

from typing import Any

from dalle.distributed.launch import rank_and_world


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (also a barrier: it returns when all ranks sent)."""
    _rank, world = rank_and_world()
    if world == 1:
        return [value]
    from dalle.distributed.horovod import allgather_object  # a single process never imports it

    return allgather_object(value)


def my_share(items: range | list[int]) -> list[int]:
    """This rank's items of a list split by shard: every world-th, starting at the rank."""
    rank, world = rank_and_world()
    return [i for n, i in enumerate(items) if n % world == rank]
