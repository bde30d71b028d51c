"""A store's summary (``framepool store info``): counts by status, split and class, streams and
their sizes, frames, failures. Computed from the metadata index alone, in columns, so that it costs
the same few file reads for ten videos as for a quarter of a million.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from storage.index import IndexTable
from storage.index_view import STATUSES


def summarize(
    path: str,
    table: IndexTable,
    attrs: Mapping[str, Any],
    class_names: list[str],
    split_lists: Mapping[str, Mapping[str, list[str]]],
) -> dict[str, Any]:
    """The JSON-able summary of the store at ``path`` (see :meth:`storage.FeatureStore.info`):
    ``table`` its index view, ``attrs`` its root attrs."""
    status_col = table.text["status"]
    by_status: dict[str, int] = {s: 0 for s in STATUSES}
    for status, n in Counter(status_col.tolist()).items():
        key = str(status or "incomplete")
        by_status[key] = by_status.get(key, 0) + n
    complete = status_col == "complete"
    by_split = Counter(table.text["split"][complete].tolist())  # counted in C, then
    by_class = Counter(table.text["label"][complete].tolist())  # the unset (None) dropped
    by_split.pop(None, None)
    by_class.pop(None, None)
    stream_dims: dict[str, int] = {}
    frames = np.zeros(int(complete.sum()), dtype=np.int64)
    for s in table.streams:
        dims = table.ints[f"d/{s}"][complete]
        held = dims >= 0
        if held.any():
            stream_dims[s] = int(dims[held][0])
            frames = np.maximum(frames, table.ints[f"T/{s}"][complete])
    failed = np.flatnonzero(status_col == "failed")
    failures = [
        {"video_id": str(table.ids[i]), "error": str(table.text["error"][i])} for i in failed
    ]
    return {
        "path": path,
        "schema_version": attrs.get("schema_version"),
        "created_by": attrs.get("created_by"),
        "n_videos": sum(by_status.values()),
        "status": by_status,
        "total_frames": int(frames.sum()),
        "streams": dict(sorted(stream_dims.items())),
        "class_names": class_names,
        "videos_per_class": dict(sorted(by_class.items())),
        "videos_per_split": dict(sorted(by_split.items())),
        "split_lists": {
            n: {p: len(ids) for p, ids in parts.items()} for n, parts in split_lists.items()
        },
        "extractor": attrs.get("extractor", {}),
        "failed": failures,
    }
