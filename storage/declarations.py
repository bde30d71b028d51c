"""Store-level settings that many writers change: immutable declaration files merged on read.

The extractor configuration per stream and the named split lists are changed by any process
writing to a store (sharded extraction declares its streams, ``store import-splits`` records a
list). Kept as one attribute document, every change read it, changed it and wrote it back, so two
writers at once lost one of their changes. Instead each change is a new file of its own under
``/index/``, named ``<kind>-<time ns>-<random>.json``, that is never rewritten; a reader lists
the files and merges them in name order (time order, ties broken by the random part, the same
order for every reader). This needs no lock and no compare-and-swap, which object stores
(``s3://``, ``gs://``, fsspec ``memory://``) do not all offer, and works on every filesystem the
store itself works on: a write of a new key is all it takes. The same scheme holds the declared
class names (:func:`storage.index.declare_class_names`) and the index parts.

- ``extractor-*``: ``{stream: config}``. The first declaration of a stream wins (the store's
  root ``extractor`` attribute, written at creation, counts as the oldest). A writer declares
  only streams it does not see yet, then lists the declarations again: when any other holds one
  of its streams with another configuration, its own file is removed and the conflict is an
  error, whichever of the two sorts first. A writer that sees no rival after its own write has
  won: a rival that wrote earlier is visible to it, and one that writes later sees it. Two
  writers at once may thus both fail (and retry), but two never both succeed, so a store never
  mixes two extractors' features in one stream.
- ``splits-*``: ``{name: {part: [video_id, ...]}}``. A later declaration of a name replaces the
  earlier one (the legacy ``/splits`` attribute counts as the oldest); declarations of different
  names never touch each other.

Declarations are rare (a few per store), so they are not compacted.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from storage.files import Files
from storage.index import INDEX_DIR, read_index_json

EXTRACTOR = "extractor"
SPLITS = "splits"
KINDS = (EXTRACTOR, SPLITS)


def _names(files: Files, kind: str) -> list[str]:
    prefix = f"{kind}-"
    return sorted(n for n in files.list(INDEX_DIR) if n.startswith(prefix) and n.endswith(".json"))


def declare(files: Files, kind: str, payload: dict[str, Any]) -> str:
    """Write ``payload`` as a new ``kind`` declaration; returns its file name."""
    if kind not in KINDS:
        raise ValueError(f"unknown declaration kind {kind!r}; expected one of {KINDS}")
    name = f"{kind}-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
    files.write(f"{INDEX_DIR}/{name}", json.dumps(payload).encode())
    return name


def withdraw(files: Files, name: str) -> None:
    """Remove one's own declaration ``name`` (after it lost a conflict)."""
    files.remove(f"{INDEX_DIR}/{name}")


def read_declarations(files: Files, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Every ``kind`` declaration as ``(file name, payload)``, oldest first."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in _names(files, kind):
        payload = read_index_json(files, name, dict, "an object")
        if payload is not None:  # None: withdrawn while listed
            out.append((name, payload))
    return out


def merged_extractor(
    files: Files, recorded: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The extractor config per stream (the first declaration of each stream wins, ``recorded``
    first) and, per stream, the file that declared it (None: ``recorded``)."""
    config = dict(recorded)
    source: dict[str, str | None] = dict.fromkeys(recorded)
    for name, payload in read_declarations(files, EXTRACTOR):
        for stream, cfg in payload.items():
            if stream not in config:
                config[stream] = cfg
                source[stream] = name
    return config, source


def conflicting_declarations(
    files: Files, own: str, streams: dict[str, Any]
) -> list[tuple[str, Any]]:
    """``(stream, config)`` of every extractor declaration other than ``own`` that holds one of
    ``streams`` with a different configuration."""
    return [
        (stream, payload[stream])
        for name, payload in read_declarations(files, EXTRACTOR)
        if name != own
        for stream in streams
        if stream in payload and payload[stream] != streams[stream]
    ]


def merged_splits(files: Files, recorded: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """The named split lists (a later declaration of a name replaces it, ``recorded`` first)."""
    lists = dict(recorded)
    for _name, payload in read_declarations(files, SPLITS):
        lists.update(payload)
    return lists


def new_streams(path: str, current: dict[str, Any], extractor: dict[str, Any]) -> dict[str, Any]:
    """The streams of ``extractor`` (stream -> configuration) that the store at ``path``, whose
    merged extractor is ``current``, does not hold yet; ValueError for a stream it holds with
    another configuration."""
    for stream, cfg in extractor.items():
        if stream in current and current[stream] != cfg:
            raise ValueError(
                f"store {path!r} holds stream {stream!r} extracted with "
                f"{current[stream]}, which differs from the requested {cfg}; "
                "use a new store (or remove the stream) to change the extractor"
            )
    return {s: cfg for s, cfg in extractor.items() if s not in current}


def declare_streams(files: Files, path: str, new: dict[str, Any]) -> None:
    """Declare the extractor configuration of streams ``new`` in a file of their own, then read
    the declarations back: a rival declaring one of them with another configuration makes this
    declaration withdraw (ValueError), whichever sorts first."""
    name = declare(files, EXTRACTOR, new)
    rivals = conflicting_declarations(files, name, new)
    if rivals:
        # The rival may have listed before this file existed and taken the stream, and only
        # "no rival seen after my own write" rules out two winners (both may lose; neither is
        # ever silently overridden).
        withdraw(files, name)
        stream, held = rivals[0]
        raise ValueError(
            f"store {path!r}: stream {stream!r} was declared at the same time with "
            f"{held}, which differs from the requested {new[stream]}; "
            "check the store's extractor and retry"
        )
