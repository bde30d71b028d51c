"""Mistakes are caught early and named: missing inputs, labels rows, stores and weights before any
model loads (usage errors, exit 2, every culprit listed); a typo'd option or choice gets the
subcommand's usage and the closest spelling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import main
from extractor.sources import make_sources

REPO = Path(__file__).resolve().parents[2]

# Runs each mistaken `framepool extract` in one fresh process, then says whether torch was ever
# imported: the checks come before the models (and torch) load, so it never is.
_SCRIPT = """
import contextlib, io, json, sys
from api.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""


def test_extract_mistakes_are_usage_errors_named_before_any_model_loads(
    real_videos: list[Path], tmp_path: Path
) -> None:
    clip, other = real_videos[0], real_videos[1]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"path,label\n{clip},a\n{tmp_path / 'clips' / 'typo.mp4'},b\n{other},b\nnot_here.avi,c\n"
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folder = tmp_path / "my_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    store = str(tmp_path / "s.zarr")
    common = ["--weights", "random", "--arch", "resnet18", "--device", "cpu"]
    cases = {
        "missing videos": ["extract", str(clip), str(tmp_path / "gone.mp4"),
                           str(tmp_path / "gone2.avi"), "--store", store, *common],
        "labels rows": ["extract", str(clip), str(other), "--labels", str(labels), "--store",
                        store, *common],
        "store is a file": ["extract", str(clip), "--store", str(a_file), *common],
        "store is a folder": ["extract", str(clip), "--store", str(folder), *common],
        "weights file": ["extract", str(clip), "--store", store, "--weights",
                         str(tmp_path / "w.pt")],
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(list(cases.values()))],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    got = dict(zip(cases, out["results"], strict=True))
    assert all(r["code"] == 2 for r in got.values()), got
    assert all(r["err"].startswith("framepool extract: error: ") for r in got.values()), got

    err = got["missing videos"]["err"]
    assert "(2 of 3)" in err and "gone.mp4" in err and "gone2.avi" in err
    assert str(clip) not in err
    err = got["labels rows"]["err"]
    assert "line 3: " in err and "typo.mp4" in err and "line 5: not_here.avi" in err
    assert "(2;" in err and "line 2" not in err and "line 4" not in err
    assert "is a file" in got["store is a file"]["err"]
    err = got["store is a folder"]["err"]
    assert "notes.txt" in err and "not a feature store" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # untouched
    assert "--weights" in got["weights file"]["err"] and "w.pt" in got["weights file"]["err"]
    assert not Path(store).exists()
    assert out["torch"] is False  # no backbone was built: torch was never even imported


def test_make_sources_names_missing_files_and_can_keep_them(
    real_videos: list[Path], tmp_path: Path
) -> None:
    clip = real_videos[0]
    gone = tmp_path / "gone.mp4"
    with pytest.raises(FileNotFoundError, match=r"gone\.mp4"):
        make_sources([clip, gone])
    kept = make_sources([clip, gone], missing="keep")
    assert [s.path for s in kept] == [clip, gone]
    # a bare file name labels any input of that name, wherever the CSV is
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{clip.name},a\nelsewhere.mp4,b\n")
    with pytest.raises(FileNotFoundError, match=r"line 3: elsewhere\.mp4") as info:
        make_sources([clip], labels=labels)
    assert clip.name not in str(info.value)
    labels.write_text(f"path,label\n{clip.name},a\n")
    assert [s.label for s in make_sources([clip], labels=labels)] == ["a"]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_a_typo_gets_the_subcommands_usage_and_the_closest_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = str(tmp_path / "s.zarr")
    err = _usage_error(["train", "--store", s, "--head", "tp", "--out", s, "--levls", "3"], capsys)
    assert err.startswith("usage: framepool train ")
    assert err.rstrip().endswith(
        "framepool train: error: unrecognized arguments: --levls 3 (did you mean --levels?)"
    )
    err = _usage_error(["store", "info", s, "--jsn"], capsys)
    assert err.startswith("usage: framepool store info ") and "did you mean --json?" in err
    # a typo'd required option: the missing one and the typo side by side
    err = _usage_error(["train", "--sotre", s, "--head", "gap", "--out", s], capsys)
    assert "required: --store; unrecognized --sotre (did you mean --store?)" in err
    err = _usage_error(["train", "--store", s, "--head", "gpa", "--out", s], capsys)
    assert "invalid choice: 'gpa'" in err and "(did you mean gap?)" in err
    err = _usage_error(["trian", "--store", s], capsys)
    assert err.startswith("usage: framepool [-h]") and "(did you mean train?)" in err
    assert "unrecognized" not in err  # --store is train's, not a top-level option
    # nothing close: no guess
    err = _usage_error(["train", "--store", s, "--head", "gap", "--out", s, "--zzzzzz"], capsys)
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err
