"""Deterministic partition of videos across processes and machines.

A video belongs to shard ``sha1(video_id) mod n``: stable across runs, machines and Python
versions (unlike ``hash()``), independent of list order, so every rank computes the same partition
with no coordination, and a rerun of a shard redoes only that shard's unfinished videos.
Shards are numbered from 0, like torchrun ranks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping


def shard_of(video_id: str, n: int) -> int:
    """The shard (0..n-1) that owns ``video_id``."""
    if n < 1:
        raise ValueError(f"number of shards must be >= 1, got {n!r}")
    digest = hashlib.sha1(video_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    parts = text.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r}: need 0 <= I < N")
    return index, count


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when launched by torchrun with more than one process, else None."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    if world <= 1:
        return None
    rank = int(env.get("RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def in_shard(video_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether ``video_id`` belongs to ``shard`` (always, without sharding)."""
    if shard is None:
        return True
    index, count = shard
    return shard_of(video_id, count) == index
