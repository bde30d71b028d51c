"""The root group of a store: where one may be created, creating it safely while other processes
do the same, and the schema version it records.

A store is never created over someone else's folder (:func:`check_store_path`), and several
processes creating one store at once all end up with the same root attrs (:func:`settled_root`,
:func:`initialise_root`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from zarr.errors import ContainsGroupError

from storage.index import INDEX_DIR
from storage.values import jsonable, node_attr, now

SCHEMA_VERSION = 1

try:  # the installed distribution's version, recorded in every store it creates
    from importlib.metadata import version as _version

    FRAMEPOOL_VERSION = _version("framepool")
except Exception:  # pragma: no cover - running from a source tree that is not installed
    FRAMEPOOL_VERSION = "0+unknown"

_OWN_MEMBERS = {"videos", INDEX_DIR}


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``) rather than a local path."""
    return "://" in path


def check_store_path(path: str | Path) -> None:
    """Raise when ``path`` can be neither an existing store nor a new one, before any work: an
    existing file (NotADirectoryError) or a folder with content that is not a Zarr group
    (ValueError naming a few of its entries); a store is never created over someone's folder.
    An absent path, an empty folder and any Zarr group pass (:meth:`FeatureStore.create` checks
    the group), as do URLs (checked when opened)."""
    spath = str(path)
    if is_url(spath):
        return
    p = Path(spath).expanduser()
    if not p.exists():
        return
    if not p.is_dir():
        raise NotADirectoryError(f"{spath!r} is a file, not a feature store (a folder)")
    if (p / "zarr.json").is_file():
        return
    entries = sorted(e.name for e in p.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (
            f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        )
        raise ValueError(
            f"{spath!r} is a folder with other content ({shown}), not a feature store; give a "
            "new path, an empty folder or an existing store"
        )


def _open_or_create_root(path: str) -> zarr.Group:
    """The root group at ``path``, created when absent. Processes creating one store at once
    race on its root: the loser of the race sees the winner's group and opens it."""
    for _attempt in range(50):
        try:
            return zarr.open_group(path, mode="a")
        except ContainsGroupError:  # created between zarr's check and its write: open it
            time.sleep(0.01)
        except Exception as exc:
            raise OSError(f"cannot create a feature store at {path!r}: {exc}") from exc
    raise OSError(f"cannot create a feature store at {path!r}: its root kept changing")


def settled_root(path: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The root group at ``path`` (created when absent) and its attrs, once a concurrent creator
    has written them: another process may be creating this store right now; it writes the root
    attrs before any member, so a member seen means its attrs can be read back (soon)."""
    root = _open_or_create_root(path)
    attrs = dict(root.attrs)
    for _attempt in range(20):
        if attrs.get("schema_version") is not None or not list(root.keys()):
            break
        time.sleep(0.01 * _attempt)
        root = zarr.open_group(path, mode="a")
        attrs = dict(root.attrs)
    return root, attrs


def initialise_root(
    root: zarr.Group,
    path: str,
    extractor: Mapping[str, Any] | None,
    class_names: list[str] | None,
) -> None:
    """Write the attrs of a new store to ``root`` (which has none) and its ``/videos`` group.

    A root with members other than the store's own is someone else's Zarr group: ValueError.
    (Only the store's own members and no attrs: two creators raced on the root document and the
    second one's empty document replaced the first one's attrs; they are written again here.)
    """
    if not set(root.keys()) <= _OWN_MEMBERS:
        raise ValueError(
            f"{path!r} is a Zarr group with content but not a framepool store "
            "(no schema_version attribute)"
        )
    root.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "created_by": f"framepool {FRAMEPOOL_VERSION}",
            "created_at": now(),
            "extractor": jsonable(dict(extractor or {})),
            "class_names": sorted(set(class_names or [])),
        }
    )
    with contextlib.suppress(ContainsGroupError):  # a concurrent creator made it
        root.require_group("videos")


def open_root(path: str, mode: str) -> zarr.Group:
    """The root group of the existing store at ``path``; FileNotFoundError when there is none."""
    if not is_url(path) and not Path(path).exists():
        raise FileNotFoundError(f"no framepool store at {path} (no such path)")
    try:
        return zarr.open_group(path, mode="r" if mode == "r" else "r+")
    except Exception as exc:  # zarr: "No group found in store ... at path ''"
        raise FileNotFoundError(
            f"no framepool store at {path} (not a Zarr group; create one with framepool extract)"
        ) from exc


def check_version(root: zarr.Group, path: str) -> None:
    """ValueError when ``root`` is not a framepool store, or one newer than this code reads."""
    version = node_attr(root, "schema_version")
    if version is None:
        raise ValueError(f"no framepool store at {path} (a Zarr group without schema_version)")
    if int(version) > SCHEMA_VERSION:
        raise ValueError(
            f"{path!r} has schema_version {version}; this framepool reads up to {SCHEMA_VERSION}"
        )
