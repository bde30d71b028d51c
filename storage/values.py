"""Attribute values as the store writes them: JSON values, timestamps in UTC.

Zarr attrs are JSON documents, so numpy scalars, paths and non-finite floats are turned into plain
JSON values before they are written (:func:`jsonable`), and every attr read back is typed ``Any``
(:func:`node_attr`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr


def now() -> str:
    """The current UTC time, ISO 8601 to the second (``extracted_at``, ``created_at``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def node_attr(node: zarr.Group | zarr.Array, key: str, default: Any = None) -> Any:
    """One attribute of a Zarr node, typed as Any (attrs are JSON values)."""
    value: Any = node.attrs.get(key, default)
    return default if value is None else value


def jsonable(value: Any) -> Any:
    """Convert numpy scalars and paths inside attrs to plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
