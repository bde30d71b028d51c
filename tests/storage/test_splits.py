"""UCF101 / HMDB51 split files and `framepool store import-splits`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from api.cli import main
from storage import FeatureStore, parse_splits


def _ucf(tmp_path: Path) -> Path:
    d = tmp_path / "ucfTrainTestlist"
    d.mkdir()
    (d / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Basketball\n")
    (d / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nBasketball/v_Basketball_g08_c01.avi 2\n"
    )
    (d / "testlist01.txt").write_text("Basketball/v_Basketball_g01_c01.avi\n")
    return d


def test_parse_ucf101(tmp_path: Path) -> None:
    parts = parse_splits("ucf101", _ucf(tmp_path), 1)
    assert parts == {
        "train": ["v_ApplyEyeMakeup_g08_c01", "v_Basketball_g08_c01"],
        "test": ["v_Basketball_g01_c01"],
    }
    with pytest.raises(FileNotFoundError, match=r"trainlist02\.txt"):
        parse_splits("ucf101", tmp_path / "ucfTrainTestlist", 2)


def test_parse_hmdb51(tmp_path: Path) -> None:
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (tmp_path / "cartwheel_test_split1.txt").write_text("d.avi 2\n")
    assert parse_splits("hmdb51", tmp_path, 1) == {"train": ["a"], "test": ["b", "d"]}
    (tmp_path / "bad_test_split2.txt").write_text("e.avi 7\n")
    with pytest.raises(ValueError, match=r"bad_test_split2\.txt:1"):
        parse_splits("hmdb51", tmp_path, 2)
    with pytest.raises(ValueError, match="split must be 1, 2 or 3"):
        parse_splits("hmdb51", tmp_path, 4)
    with pytest.raises(ValueError, match="format must be one of"):
        parse_splits("kinetics", tmp_path, 1)


def test_cli_import_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    for vid, label in (
        ("v_Basketball_g01_c01", "Basketball"),
        ("v_Basketball_g08_c01", "Basketball"),
    ):
        store.write_video(vid, {"appearance": np.ones((3, 4))}, label=label)
    assert (
        main(
            [
                "store",
                "import-splits",
                str(path),
                "--format",
                "ucf101",
                "--dir",
                str(_ucf(tmp_path)),
                "--split",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ucf101-1/train: 2 videos listed, 1 in the store" in out
    s = FeatureStore.open(path)
    assert s.videos(split="ucf101-1/test") == ["v_Basketball_g01_c01"]
    assert main(["store", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "complete=2" in out and "ucf101-1: train=2, test=1" in out
    assert main(["store", "info", str(path), "--json"]) == 0
    assert '"n_videos": 2' in capsys.readouterr().out
    assert main(["store", "info", str(tmp_path / "missing.zarr")]) == 2
    assert "no framepool store" in capsys.readouterr().err


def test_cli_set_groups_from_a_pattern_or_a_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    for vid in ("v_Run_g08_c01", "v_Run_g09_c02", "v_Jump_g08_c03"):
        store.write_video(vid, {"appearance": np.ones((2, 3))}, label=vid.split("_")[1])
    store.mark_failed("v_Jump_g10_c01", "broken", label="Jump")
    assert main(["store", "set-groups", str(path), "--pattern", "_(g[0-9]+)_"]) == 0
    assert "4 videos in 3 groups (4 changed), 0 videos without a group" in capsys.readouterr().out
    ro = FeatureStore.open(path, "r")
    ids = ["v_Jump_g08_c03", "v_Jump_g10_c01", "v_Run_g08_c01", "v_Run_g09_c02"]
    assert ro.groups(ids) == ["g08", "g10", "g08", "g09"]

    csv = tmp_path / "groups.csv"
    csv.write_text("video_id,group\nv_Run_g08_c01,alice\nv_Run_g09_c02,g09\nnot_there,bob\n")
    assert main(["store", "set-groups", str(path), "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "2 videos in 2 groups (1 changed)" in out and "1 listed ids not in the store" in out
    assert FeatureStore.open(path, "r").groups(ids) == ["g08", "g10", "alice", "g09"]

    # a pattern that misses a video, a CSV without the columns: usage errors naming the problem
    assert main(["store", "set-groups", str(path), "--pattern", "_(x[0-9]+)_"]) == 2
    assert "does not match video id 'v_Jump_g08_c03'" in capsys.readouterr().err
    csv.write_text("id,subject\na,b\n")
    assert main(["store", "set-groups", str(path), "--csv", str(csv)]) == 2
    assert "needs a header with columns video_id,group" in capsys.readouterr().err
