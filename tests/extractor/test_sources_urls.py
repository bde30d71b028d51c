"""Videos on object storage (a moto S3 server on 127.0.0.1): URLs stay URLs through input
expansion, ids and labels work as for local files, and decoding goes through fsspec file objects
under the same demuxer allowlist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extractor.decode import VideoError, count_frames, iter_frames, probe
from extractor.flow import sha256_file
from extractor.sources import expand_inputs, make_sources
from tests.extractor.conftest import S3Server


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server, short_real_video: Path) -> str:
    fs = s3_server.filesystem()
    fs.mkdir("vids")
    fs.put_file(str(short_real_video), "vids/run/a.mp4")
    fs.put_file(str(short_real_video), "vids/jump/b.mp4")
    fs.pipe_file("vids/jump/notes.md", b"not a video suffix: not listed")
    fs.pipe_file("vids/jump/fake.mp4", b"this is not a video\n" * 30)
    fs.pipe_file("vids/empty.mp4", b"")
    fs.pipe_file("vids/list.txt", b"# two videos\nrun/a.mp4\n\n/jump/b.mp4\n")  # /: the bucket
    fs.pipe_file("vids/playlist.mp4", b"ffconcat version 1.0\nfile 'run/a.mp4'\n")
    return "s3://vids"


def test_a_url_stays_a_url(bucket: str) -> None:
    assert expand_inputs([f"{bucket}/run/a.mp4"]) == [f"{bucket}/run/a.mp4"]
    assert expand_inputs([f"{bucket}/missing.mp4"]) == [f"{bucket}/missing.mp4"]  # fails later


def test_url_folders_and_lists(bucket: str, tmp_path: Path) -> None:
    assert expand_inputs([f"{bucket}/jump/", f"{bucket}/run"]) == [
        f"{bucket}/jump/b.mp4",
        f"{bucket}/jump/fake.mp4",
        f"{bucket}/run/a.mp4",
    ]
    assert expand_inputs([f"{bucket}/list.txt"]) == [f"{bucket}/run/a.mp4", f"{bucket}/jump/b.mp4"]
    local_list = tmp_path / "remote.txt"
    local_list.write_text(f"{bucket}/jump/b.mp4\n")
    assert expand_inputs([local_list]) == [f"{bucket}/jump/b.mp4"]


def test_ids_and_labels_of_urls(bucket: str, tmp_path: Path) -> None:
    sources = make_sources([f"{bucket}/list.txt"])
    assert [(s.video_id, s.label) for s in sources] == [("a", "run"), ("b", "jump")]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label,split\n{bucket}/run/a.mp4,sprint,train\nb.mp4,hop,test\n")
    sources = make_sources([f"{bucket}/list.txt"], labels=labels)
    assert [(s.label, s.split) for s in sources] == [("sprint", "train"), ("hop", "test")]


def test_decoding_a_url_equals_the_local_file(bucket: str, short_real_video: Path) -> None:
    url = f"{bucket}/run/a.mp4"
    assert probe(url) == probe(short_real_video)
    assert count_frames(url) == count_frames(short_real_video)
    for remote, local in zip(iter_frames(url), iter_frames(short_real_video), strict=True):
        np.testing.assert_array_equal(remote, local)
    assert sha256_file(url) == sha256_file(short_real_video)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("jump/fake.mp4", "cannot be read as a video"),
        ("empty.mp4", "empty file"),
        ("missing.mp4", "no such file"),
        ("playlist.mp4", "not an accepted video container (an FFmpeg concat playlist)"),
    ],
)
def test_bad_urls_name_the_url(bucket: str, name: str, problem: str) -> None:
    url = f"{bucket}/{name}"
    with pytest.raises(VideoError) as err:
        count_frames(url)
    assert f"{url!r}" in str(err.value) and problem in str(err.value)
