"""``framepool store info|import-splits|set-groups|export|reindex|verify``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from api.cli import UsageError
from api.cli.options import SPLIT_FORMATS

if TYPE_CHECKING:
    from storage import FeatureStore

EXPORT_FORMATS = ("npy", "npz")


def open_store(path: str, mode: str = "r") -> FeatureStore:
    from storage import FeatureStore

    return FeatureStore.open(path, mode)  # type: ignore[arg-type]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "store",
        help="inspect a feature store, import split lists, export features",
        description="Inspect a feature store, import split lists, export features as NumPy files.",
    )
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION")
    ssub.required = True

    info = ssub.add_parser("info", help="summarise a store")
    info.add_argument("path", help="store path or fsspec URL")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=run_info)

    imp = ssub.add_parser("import-splits", help="import UCF101/HMDB51 split lists")
    imp.add_argument("path", help="store path or fsspec URL")
    imp.add_argument("--format", required=True, choices=SPLIT_FORMATS)
    imp.add_argument("--dir", required=True, help="folder with the split files")
    imp.add_argument("--split", required=True, type=int, choices=(1, 2, 3))
    imp.add_argument(
        "--name", default=None, help="list name (default: <format>-<split>, e.g. ucf101-1)"
    )
    imp.set_defaults(func=run_import_splits)

    grp = ssub.add_parser(
        "set-groups",
        help="record each video's group (subject, session), which train validates on whole",
        description="Record each video's group: from a CSV with columns video_id,group, or from "
        "a regular expression on the video ids whose first capture group is the group "
        "(e.g. '_(g[0-9]+)_' for UCF101's v_<Class>_g08_c01). framepool train then holds out "
        "whole groups for validation (--val-groups auto).",
    )
    grp.add_argument("path", metavar="STORE", help="store path or fsspec URL")
    source = grp.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV with a header and columns video_id,group")
    source.add_argument("--pattern", help="regular expression on video ids")
    grp.set_defaults(func=run_set_groups)

    exp = ssub.add_parser(
        "export",
        help="write per-video NumPy files (<video_id>_<stream>.npy, as video_features names them)",
        description="Write one float32 [T, d] file per video and stream, named "
        "<video_id>_<stream>.npy (or .npz, the array stored under the stream's name).",
    )
    exp.add_argument("path", metavar="STORE", help="store path or fsspec URL")
    exp.add_argument("--format", default="npy", choices=EXPORT_FORMATS, help="file format")
    exp.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    exp.add_argument(
        "--split",
        default=None,
        help="only videos of this split (a split attr or LIST/PART); default: every complete video",
    )
    exp.add_argument(
        "--streams",
        default=None,
        help="comma-separated streams to write; default: every stream of each video",
    )
    exp.set_defaults(func=run_export)

    rei = ssub.add_parser(
        "reindex",
        help="rebuild the store's metadata index from the per-video groups",
        description="Rebuild the metadata index from the per-video groups and replace every "
        "index file with it. Run it while no extraction writes to the store.",
    )
    rei.add_argument("path", help="store path or fsspec URL")
    rei.set_defaults(func=run_reindex)

    ver = ssub.add_parser(
        "verify",
        help="read every complete video and list the damaged ones",
        description="Read every stream of every complete video in parallel and list those with "
        "a missing, truncated or altered chunk. Damaged videos are marked incomplete (unless "
        "--dry-run), so that the next `framepool extract` redoes them. Exit 0: no damage; 1: "
        "damage found.",
    )
    ver.add_argument("path", help="store path or fsspec URL")
    ver.add_argument("--workers", type=int, default=8, help="reader threads (default 8)")
    ver.add_argument(
        "--dry-run", action="store_true", help="only list damaged videos, mark nothing"
    )
    ver.add_argument("--json", action="store_true", help="print the damaged videos as JSON")
    ver.set_defaults(func=run_verify)


_SUMMARY_KEYS = ("arch", "feature_dim", "weights", "input_size", "dtype")


def describe_extractor(cfg: Any) -> str:
    """The fields of one stream's extractor config a reader needs (``--json`` shows them all)."""
    if not isinstance(cfg, dict):
        return str(cfg)
    parts = [f"{k}={cfg[k]}" for k in _SUMMARY_KEYS if cfg.get(k) is not None]
    flow = cfg.get("flow")
    if isinstance(flow, dict) and "backend" in flow:
        parts.append(f"flow={flow['backend']}")
    known = set(_SUMMARY_KEYS) | {"flow"}
    if not any(k in cfg for k in known):  # not framepool's layout: show what there is
        parts = [f"{k}={v}" for k, v in cfg.items()]
    return ", ".join(parts)


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"store        {info['path']}",
        f"created by   {info['created_by']} (schema {info['schema_version']})",
        f"videos       {info['n_videos']}  "
        + "  ".join(f"{k}={v}" for k, v in info["status"].items()),
        f"frames       {info['total_frames']}",
        "streams      " + (", ".join(f"{k} (d={v})" for k, v in info["streams"].items()) or "-"),
        f"classes      {len(info['class_names'])}: "
        + ", ".join(info["class_names"][:12])
        + (" ..." if len(info["class_names"]) > 12 else ""),
    ]
    if info["videos_per_split"]:
        lines.append(
            "splits       " + ", ".join(f"{k}={v}" for k, v in info["videos_per_split"].items())
        )
    for name, parts in info["split_lists"].items():
        lines.append(f"split list   {name}: " + ", ".join(f"{p}={n}" for p, n in parts.items()))
    for stream, cfg in info["extractor"].items():
        lines.append(f"extractor    {stream}: {describe_extractor(cfg)}")
    if info["failed"]:
        lines.append(f"failed       {len(info['failed'])}:")
        lines.extend(f"  {f['video_id']}: {f['error']}" for f in info["failed"])
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    info = open_store(args.path, "r").info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def run_import_splits(args: argparse.Namespace) -> int:
    from storage import parse_splits

    store = open_store(args.path, "r+")
    parts = parse_splits(args.format, args.dir, args.split)
    known = set(store.videos(status=None))
    name = args.name or f"{args.format}-{args.split}"
    store.set_split_list(name, parts)
    for part, ids in parts.items():
        missing = [v for v in ids if v not in known]
        print(
            f"{name}/{part}: {len(ids)} videos listed, {len(ids) - len(missing)} in the store"
            + (f", {len(missing)} not extracted (e.g. {missing[0]})" if missing else "")
        )
    return 0


def read_group_csv(path: str) -> dict[str, str]:
    """``{video_id: group}`` from a CSV with a header and columns video_id,group."""
    from extractor.sources import read_csv_rows

    try:
        rows = read_csv_rows(path, f"--csv {path!r}", ("video_id", "group"), "video_id,group")
        return {row["video_id"]: row["group"] for row in rows}
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def run_set_groups(args: argparse.Namespace) -> int:
    store = open_store(args.path, "r+")
    ids = store.videos(status=None)
    if args.csv is not None:
        wanted = read_group_csv(args.csv)
        unknown = [v for v in wanted if v not in set(ids)]
        targets = {v: g for v, g in wanted.items() if v not in set(unknown)}
    else:
        from aggregator.data import video_groups

        try:
            groups, _ = video_groups(store, ids, args.pattern)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        assert groups is not None
        unknown, targets = [], dict(zip(ids, groups, strict=True))
    current = dict(zip(ids, store.groups(ids), strict=True))
    changed = 0
    for vid, group in targets.items():
        if current[vid] != group:
            store.update_video_attrs(vid, group=group)
            changed += 1
    without = sum(1 for v in ids if v not in targets and current[v] is None)
    print(
        f"groups: {len(targets)} videos in {len(set(targets.values()))} groups "
        f"({changed} changed), {without} videos without a group"
        + (f"; {len(unknown)} listed ids not in the store (e.g. {unknown[0]})" if unknown else "")
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from storage.export import export_store

    store = open_store(args.path, "r")
    streams = None
    if args.streams is not None:
        streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    summary = export_store(store, args.out, fmt=args.format, split=args.split, streams=streams)
    print(summary.format())
    return 0


def run_reindex(args: argparse.Namespace) -> int:
    store = open_store(args.path, "r+")
    counts = store.reindex()
    print(
        f"reindexed {args.path}: {counts['videos']} videos  "
        + "  ".join(f"{k}={v}" for k, v in counts.items() if k != "videos")
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    store = open_store(args.path, "r" if args.dry_run else "r+")
    n = len(store.videos())
    damaged = store.verify(workers=args.workers, mark=not args.dry_run)
    if args.json:
        print(json.dumps({"checked": n, "damaged": damaged}, indent=2))
    else:
        print(f"checked {n} complete videos in {args.path}: {len(damaged)} damaged")
        for d in damaged:
            print(f"  {d['video_id']}: {d['key']}")
        if damaged:
            print(
                "listed videos are now incomplete; `framepool extract` redoes them"
                if not args.dry_run
                else "run without --dry-run to mark them for `framepool extract` to redo"
            )
    return 1 if damaged else 0
