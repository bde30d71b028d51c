"""The command line's front door: fast help without torch, defaults in every help text, one
option vocabulary (old spellings still accepted), and messages a user can act on."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from api.cli import build_parser, main
from api.cli import options as opts
from storage import FeatureStore

REPO = Path(__file__).resolve().parents[2]

_NO_TORCH = r"""
import contextlib, io, sys
from api.cli import main
calls = [[], ["--help"]] + [[*c.split(), "--help"] for c in sys.argv[1:]]
calls += [["extract", "x.mp4"], ["extract", "x.mp4", "--store", "s", "--streams", "depth"],
          ["train", "--store", "s"], ["store", "export", "s", "--format", "csv", "--out", "o"]]
for argv in calls:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, 2), (argv, exc.code)
heavy = sorted(m for m in ("torch", "torchvision", "zarr", "cv2", "timm") if m in sys.modules)
print("loaded:", ",".join(heavy))
"""

COMMANDS = [
    "extract", "store", "store info", "store import-splits", "store export", "train", "evaluate",
    "summarize", "index", "index build", "finetune", "serve", "quickstart",
]  # fmt: skip


def test_help_and_usage_errors_never_import_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *COMMANDS],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "loaded:", out.stdout + out.stderr


def _subparsers(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(_subparsers(sub, f"{prefix}{name} "))
    return found


def test_every_help_text_shows_every_default() -> None:
    subs = _subparsers(build_parser())
    assert set(COMMANDS) <= set(subs)
    checked = 0
    for name, sub in subs.items():
        formatter = sub._get_formatter()
        assert isinstance(formatter, opts.HelpFormatter), name
        for action in sub._actions:
            if not action.option_strings or not opts.HelpFormatter._shows_default(action):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            text = formatter._format_action(action)
            assert "default" in text, (name, action.option_strings, text)
            checked += 1
    assert checked > 50
    extract = " ".join(subs["extract"].format_help().split())
    assert "(default: 32)" in extract and "(default: imagenet)" in extract
    assert ".mp4" in extract and ".avi" in extract  # which files a folder search finds
    assert "``" not in subs["quickstart"].format_help()  # no raw markup


def test_one_vocabulary_old_spellings_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    new = parser.parse_args(
        ["extract", "v.mp4", "--store", "s", "--precision", "fp32", "--decode-workers", "3"]
    )
    old = parser.parse_args(
        ["extract", "v.mp4", "--store", "s", "--dtype", "float32", "--workers", "3"]
    )
    assert (new.precision, new.decode_workers) == (old.precision, old.decode_workers) == ("fp32", 3)
    err = capsys.readouterr().err
    assert "--dtype float32 is deprecated; use --precision fp32" in err
    assert "--workers 3 is deprecated; use --decode-workers 3" in err
    assert main(["extract", "v.mp4", "--store", "s", "--streams", "appearance,depth"]) == 2
    assert "--streams: expected appearance, motion" in capsys.readouterr().err
    train = ["train", "--store", "s", "--head", "gap", "--out", "o"]
    assert parser.parse_args([*train, "--streams", "motion,appearance"]).stream == "both"
    assert parser.parse_args([*train, "--stream", "motion"]).stream == "motion"
    assert "--stream motion is deprecated; use --streams motion" in capsys.readouterr().err
    ft = ["finetune", "--videos", "v", "--out", "o"]
    assert parser.parse_args([*ft, "--amp", "on"]).precision == "bf16"
    assert parser.parse_args([*ft, "--amp", "off"]).precision == "fp32"
    assert parser.parse_args([*ft, "--streams", "appearance,motion"]).stream == "both"
    assert parser.parse_args(["serve", "--run", "r", "--torch-threads", "2"]).torch_threads == 2
    assert parser.parse_args(["serve", "--run", "r", "--threads", "2"]).torch_threads == 2
    assert "--torch-threads 2 is deprecated" in capsys.readouterr().err


def test_the_light_constants_mirror_the_packages() -> None:
    from api.cli.store_cmd import EXPORT_FORMATS as CLI_EXPORT_FORMATS
    from extractor.backbones import ARCHS, STREAMS
    from extractor.flow import FLOW_BACKENDS
    from extractor.sources import VIDEO_SUFFIXES
    from storage import SPLIT_FORMATS
    from storage.export import EXPORT_FORMATS

    assert opts.STREAMS == STREAMS and opts.FLOW_BACKENDS == FLOW_BACKENDS
    assert tuple(sorted(ARCHS)) == opts.RESNET_ARCHS and opts.SPLIT_FORMATS == SPLIT_FORMATS
    assert tuple(sorted(VIDEO_SUFFIXES)) == opts.VIDEO_EXTENSIONS
    assert CLI_EXPORT_FORMATS == EXPORT_FORMATS


def test_messages_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["store", "info", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no framepool store at {empty}" in err and "No group found" not in err

    assert main(["extract", str(empty), "--store", str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert f"no videos found in {empty}" in err and ".mp4" in err and ".avi" in err
    assert "[" not in err  # no Python list repr

    store = FeatureStore.create(tmp_path / "nosplits.zarr", extractor={"appearance": {"a": 1}})
    for i in range(4):
        store.write_video(f"v{i}", {"appearance": np.ones((3, 4))}, label=f"c{i % 2}")
    argv = ["train", "--store", str(store.path), "--head", "gap", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no splits" in err and "split column" in err and "store import-splits" in err
