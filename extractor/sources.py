"""What to extract: inputs (files, folders, list files) -> sources with ids, labels and splits.

- A file is a video (whatever its name, so that a broken one is recorded as failed, not skipped),
  except ``.txt`` files, which are lists: one path per line, relative paths taken relative to the
  list's folder, blank lines and ``#`` comments ignored. :func:`expand_inputs` keeps a missing
  path (a file that vanishes before it is read fails with a reason); :func:`make_sources` refuses
  missing paths up front, all of them named in one FileNotFoundError, as it refuses a labels CSV
  row whose file neither exists nor labels an input (a typo would otherwise leave its video
  unlabelled).
- A folder is searched recursively for files with a video suffix (:data:`VIDEO_SUFFIXES`).
- Labels: from a CSV with a header and columns ``path,label[,split][,group]`` (paths relative to
  the CSV's folder, or bare file names when unique), else the name of the video's parent folder.
  ``group`` names what videos share besides their class (a subject, a session); the trainer keeps
  each group on one side of its validation split.
- Video ids: the safe file stem, deterministic whatever the input order
  (:func:`storage.assign_video_ids`).
- URLs (``s3://bucket/videos/``, ``gs://...``; see :mod:`extractor.urls`) work as paths do:
  a URL folder is searched recursively through fsspec, a ``.txt`` URL is a list (relative entries
  relative to its folder), a list may name URLs, and a video's label defaults to the name of the
  folder holding it. URLs stay URLs (strings); local paths are absolute :class:`~pathlib.Path`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from extractor.urls import (
    VideoPath,
    is_url,
    join_url,
    list_url_folder,
    read_url_text,
    url_name,
    url_parent,
)
from storage import assign_video_ids

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv"}
)
LIST_SUFFIX = ".txt"


@dataclass(frozen=True)
class Source:
    """One video to extract."""

    path: VideoPath  # an absolute Path, or a URL
    video_id: str
    label: str | None
    split: str | None
    group: str | None = None


def _absolute(path: Path) -> Path:
    """Absolute and normalised (``..`` removed), symlinks kept as they are."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _list_entries(text: str) -> Iterator[str]:
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield entry


def _read_list(path: VideoPath) -> list[VideoPath]:
    """The entries of a list file (local or a URL), relative ones taken relative to its folder."""
    if is_url(path):
        url = str(path)
        try:
            text = read_url_text(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"video list {url!r} does not exist") from None
        return [join_url(url_parent(url), e) for e in _list_entries(text)]
    local = Path(path)
    if not local.is_file():
        raise FileNotFoundError(f"video list {str(local)!r} does not exist")
    out: list[VideoPath] = []
    for entry in _list_entries(local.read_text(encoding="utf-8")):
        if is_url(entry):
            out.append(entry)
            continue
        p = Path(entry).expanduser()
        out.append(p if p.is_absolute() else local.parent / p)
    return out


def expand_inputs(inputs: Iterable[str | Path]) -> list[VideoPath]:
    """Absolute video paths and URLs (first occurrence of duplicates kept) from files, folders,
    lists."""
    seen: set[VideoPath] = set()
    out: list[VideoPath] = []

    def add(p: VideoPath) -> None:
        a: VideoPath = p if is_url(p) else _absolute(Path(p))
        if a not in seen:
            seen.add(a)
            out.append(a)

    for item in inputs:
        if is_url(item):
            url = str(item)
            found = list_url_folder(url, VIDEO_SUFFIXES)
            if found is not None:
                for entry_url in found:
                    add(entry_url)
            elif url_name(url).lower().endswith(LIST_SUFFIX):
                for entry in _read_list(url):
                    add(entry)
            else:
                add(url)
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES:
                    add(f)
        elif p.suffix.lower() == LIST_SUFFIX:
            for entry in _read_list(p):
                if isinstance(entry, Path) and entry.is_dir():
                    raise ValueError(f"list {str(p)!r} names a folder, {str(entry)!r}; list files")
                add(entry)
        else:
            add(p)
    return out


LabelEntry = tuple[str, str | None, str | None]  # label, split, group


@dataclass(frozen=True)
class LabelTable:
    """Labels (and splits, groups) from a CSV, looked up by absolute path or unique file name."""

    by_path: dict[VideoPath, LabelEntry]
    by_name: dict[str, LabelEntry]
    rows: tuple[tuple[int, str, Path], ...] = ()  # (line, path as written, absolute path)

    def get(self, path: VideoPath) -> LabelEntry | None:
        if is_url(path):
            return self.by_path.get(str(path)) or self.by_name.get(url_name(str(path)))
        p = Path(path)
        return self.by_path.get(_absolute(p)) or self.by_name.get(p.name)

    def missing_rows(self, paths: Sequence[VideoPath]) -> list[tuple[int, str]]:
        """``(line, path as written)`` of the local rows whose file does not exist and that label
        none of ``paths`` (a bare file name labels any input of that name)."""
        inputs = {_absolute(Path(p)) for p in paths if not is_url(p)}
        names = {url_name(str(p)) if is_url(p) else Path(p).name for p in paths}
        return [
            (line, text)
            for line, text, absolute in self.rows
            if absolute not in inputs
            and not (Path(text).name == text and text in names)
            and not absolute.exists()
        ]


def read_csv_rows(
    csv_path: str | Path, what: str, required: Sequence[str], columns: str
) -> Iterator[dict[str, str]]:
    """The rows of a CSV with a header, their keys and values stripped. FileNotFoundError when
    ``csv_path`` is not a file; ValueError naming ``what`` (e.g. "labels file 'x.csv'") when a
    ``required`` column is missing from the header (``columns`` describes them all) or empty in
    a row, with the line."""
    p = Path(csv_path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} does not exist")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if any(c not in fields for c in required):
            raise ValueError(f"{what} needs a header with columns {columns}; found {fields}")
        for n, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if any(not row.get(c) for c in required):
                raise ValueError(f"{what}, line {n}: empty {' or '.join(required)}: {row}")
            yield row


def read_labels(csv_path: str | Path) -> LabelTable:
    """Read ``path,label[,split][,group]`` rows (with a header) from ``csv_path``."""
    p = Path(csv_path).expanduser()
    by_path: dict[VideoPath, LabelEntry] = {}
    names: dict[str, list[LabelEntry]] = {}
    rows: list[tuple[int, str, Path]] = []
    what = f"labels file {str(p)!r}"
    for line, row in enumerate(
        read_csv_rows(p, what, ("path", "label"), "path,label[,split][,group]"), start=2
    ):
        entry = (row["label"], row.get("split") or None, row.get("group") or None)
        if is_url(row["path"]):
            by_path[row["path"]] = entry
            continue
        rel = Path(row["path"]).expanduser()
        absolute = _absolute(rel if rel.is_absolute() else p.parent / rel)
        by_path[absolute] = entry
        rows.append((line, row["path"], absolute))
        if rel.name == row["path"]:  # a bare file name
            names.setdefault(rel.name, []).append(entry)
    by_name = {name: entries[0] for name, entries in names.items() if len(entries) == 1}
    return LabelTable(by_path, by_name, tuple(rows))


def _listed(items: Sequence[str], limit: int = 10) -> str:
    more = len(items) - limit
    return "\n  " + "\n  ".join(items[:limit]) + (f"\n  ... and {more} more" if more > 0 else "")


def make_sources(
    inputs: Sequence[str | Path],
    *,
    labels: str | Path | None = None,
    missing: Literal["error", "keep"] = "error",
) -> list[Source]:
    """Expand ``inputs`` and attach ids, labels and splits (see the module doc).

    Raises FileNotFoundError naming every input path that does not exist, and every row of the
    ``labels`` CSV whose file does not exist and labels no input (``missing="keep"`` keeps
    missing paths instead, to fail one by one when extracted).
    """
    paths = expand_inputs(inputs)
    if not paths:
        raise ValueError(
            f"no videos found in {', '.join(str(i) for i in inputs)}: folders are searched "
            f"for files ending in {', '.join(sorted(VIDEO_SUFFIXES))}; a {LIST_SUFFIX} file lists "
            "one video per line"
        )
    if missing not in ("error", "keep"):
        raise ValueError(f"missing must be 'error' or 'keep', got {missing!r}")
    # URLs are not checked one by one here (a request each): a missing one fails when extracted
    absent = [str(p) for p in paths if not is_url(p) and not Path(p).exists()]
    if absent and missing == "error":
        raise FileNotFoundError(
            f"video paths that do not exist ({len(absent)} of {len(paths)}):{_listed(absent)}"
        )
    table = read_labels(labels) if labels is not None else None
    if table is not None and missing == "error":
        rows = table.missing_rows(paths)
        if rows:
            raise FileNotFoundError(
                f"rows of the labels file {str(labels)!r} whose file does not exist ({len(rows)}; "
                "paths are relative to the CSV's folder, or bare file names of the inputs):"
                + _listed([f"line {n}: {text}" for n, text in rows])
            )
    ids = assign_video_ids(str(p) for p in paths)
    out = []
    unlabelled = []
    for p in paths:
        label: str | None
        split: str | None = None
        group: str | None = None
        if table is None:
            label = (url_name(url_parent(str(p))) if is_url(p) else Path(p).parent.name) or None
        else:
            found = table.get(p)
            if found is None:
                unlabelled.append(str(p))
                label = None
            else:
                label, split, group = found
        out.append(Source(path=p, video_id=ids[str(p)], label=label, split=split, group=group))
    if unlabelled:
        log.warning(
            "%d videos are not in the labels file %s (extracted without a label): %s",
            len(unlabelled),
            labels,
            ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else ""),
        )
    return out
