"""Derived data kept in the store under ``/cache/<name>/<key>``: node means and maxes, similarity
indexes, anything computed from the features and keyed by a hash of what it was derived from.

An entry reads as absent until :func:`finish_cache` marks it complete, so an interrupted writer
never leaves a half-filled cache that looks usable. Writing one key removes the other keys under
the same name: they were derived from data that has since changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from storage.values import jsonable, now


def read_cache(root: zarr.Group, name: str, key: str) -> dict[str, Any] | None:
    """Arrays and attrs cached under ``/cache/<name>/<key>`` of ``root``, or None when absent or
    incomplete: ``{"attrs": {...}, <array name>: zarr.Array, ...}``."""
    path = f"cache/{name}/{key}"
    try:
        grp = root[path]
    except KeyError:
        return None
    if not isinstance(grp, zarr.Group) or not grp.attrs.get("complete"):
        return None
    out: dict[str, Any] = {"attrs": dict(grp.attrs)}
    for arr_name, arr in grp.arrays():
        out[arr_name] = arr
    return out


def write_cache(
    root: zarr.Group,
    name: str,
    key: str,
    shapes: Mapping[str, tuple[tuple[int, ...], str, tuple[int, ...]]],
    attrs: Mapping[str, Any] | None = None,
    *,
    raw: bool = False,
) -> dict[str, zarr.Array]:
    """Create empty cache arrays ``{array: (shape, dtype, chunks)}`` under a fresh group (see
    :meth:`storage.store.FeatureStore.write_cache`)."""
    parent = root.require_group(f"cache/{name}")
    for old in list(parent.group_keys()):
        if old != key:
            del parent[old]
    grp = parent.create_group(
        key, overwrite=True, attributes={**jsonable(dict(attrs or {})), "complete": False}
    )
    arrays = {}
    for arr_name, (shape, dtype, chunks) in shapes.items():
        if raw:
            floating = np.issubdtype(np.dtype(dtype), np.floating)
            arrays[arr_name] = grp.create_array(
                name=arr_name,
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                fill_value=np.nan if floating else 0,
                serializer=BytesCodec(endian="little"),
                compressors=[Crc32cCodec()],
            )
        else:
            arrays[arr_name] = grp.create_array(
                name=arr_name, shape=shape, dtype=dtype, chunks=chunks
            )
    return arrays


def finish_cache(root: zarr.Group, name: str, key: str) -> None:
    """Mark the entry ``/cache/<name>/<key>`` complete: from now on it reads back."""
    grp = root[f"cache/{name}/{key}"]
    grp.attrs.update({"complete": True, "created_at": now()})
