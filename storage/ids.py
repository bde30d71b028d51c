"""Video ids: file stems made safe for use as Zarr group names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_video_id(stem: str) -> str:
    """Return ``stem`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``_``.

    Leading dots are replaced too, so that an id never names a hidden file or ``..``.
    """
    if not stem:
        raise ValueError("video id stem is empty")
    safe = _UNSAFE.sub("_", stem)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def assign_video_ids(paths: Iterable[str | Path]) -> dict[str, str]:
    """Map each source path to a unique, deterministic video id.

    The id is the safe file stem; when two different paths share a stem, every one of them gets a
    short hash of its full path appended, so that the mapping does not depend on list order.
    """
    by_id: dict[str, list[str]] = {}
    for p in paths:
        key = str(p)
        by_id.setdefault(safe_video_id(Path(key).stem or Path(key).name), []).append(key)
    out: dict[str, str] = {}
    for vid, members in by_id.items():
        unique = sorted(set(members))
        if len(unique) == 1:
            out[unique[0]] = vid
        else:
            for m in unique:
                out[m] = f"{vid}-{short_hash(str(Path(m).resolve()) if '://' not in m else m)}"
    return out
