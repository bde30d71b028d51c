"""Only local video containers are opened: images and playlists are refused whatever their name."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from api.cli import main
from extractor.decode import UnsupportedFormat, VideoError, count_frames, iter_frames, probe
from storage.store import FeatureStore
from tests.extractor.conftest import textured_frames, write_clip


def write_png(path: Path) -> Path:
    Image.fromarray(textured_frames(1, 48, 64)[0]).save(path, format="PNG")
    return path


def write_gif(path: Path) -> Path:
    frames = [Image.fromarray(f) for f in textured_frames(5, 48, 64)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return path


def write_ffconcat(path: Path, entry: str) -> Path:
    path.write_text(f"ffconcat version 1.0\nfile {entry}\n")
    return path


@pytest.fixture()
def playlist_beside_a_clip(tmp_path: Path, short_real_video: Path) -> Path:
    """An ffconcat playlist named .mp4 whose entry is a real clip in the same folder (an upload
    folder holds other users' uploads)."""
    shutil.copy(short_real_video, tmp_path / "someone_elses.mp4")
    return write_ffconcat(tmp_path / "upload.mp4", "someone_elses.mp4")


def test_the_playlist_would_read_the_file_beside_it(playlist_beside_a_clip: Path) -> None:
    # what an unrestricted av.open does with it: decodes the other file's 32 frames
    with av.open(str(playlist_beside_a_clip)) as container:
        assert container.format.name == "concat"
        assert sum(1 for _ in container.decode(video=0)) == 32


def test_a_playlist_named_mp4_is_refused(playlist_beside_a_clip: Path) -> None:
    for call in (probe, count_frames, lambda p: next(iter_frames(p))):
        with pytest.raises(UnsupportedFormat, match="concat playlist") as info:
            call(playlist_beside_a_clip)
        assert str(playlist_beside_a_clip) in str(info.value)
        assert "accepted: mp4/mov" in str(info.value)


def test_a_playlist_without_its_header_is_not_a_video(
    tmp_path: Path, short_real_video: Path
) -> None:
    shutil.copy(short_real_video, tmp_path / "x.mp4")
    bare = tmp_path / "bare.mp4"
    bare.write_text("file x.mp4\n")  # FFmpeg does not take this for a playlist; still no video
    with pytest.raises(VideoError):
        probe(bare)
    hls = tmp_path / "hls.mp4"
    hls.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nx.mp4\n#EXT-X-ENDLIST\n")
    with pytest.raises(VideoError, match=str(hls)):
        probe(hls)


@pytest.mark.parametrize("name", ["picture.png", "picture.mp4", "picture.avi"])
def test_a_png_is_refused_whatever_its_name(tmp_path: Path, name: str) -> None:
    png = write_png(tmp_path / name)
    with Image.open(png) as im:  # it is a valid image
        assert im.format == "PNG"
    with pytest.raises(UnsupportedFormat, match="png_pipe") as info:
        probe(png)
    assert str(png) in str(info.value)
    with pytest.raises(UnsupportedFormat):
        list(iter_frames(png))


def test_an_animated_gif_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormat, match="gif"):
        probe(write_gif(tmp_path / "anim.mp4"))


CONTAINERS = [(".mkv", "libx264"), (".webm", "libvpx"), (".mov", "mpeg4"), (".mpg", "mpeg2video")]


@pytest.mark.parametrize(("suffix", "codec"), CONTAINERS)
def test_generated_video_containers_are_accepted(tmp_path: Path, suffix: str, codec: str) -> None:
    clip = write_clip(tmp_path / f"clip{suffix}", textured_frames(6, 48, 64), codec=codec)
    assert probe(clip).width == 64
    assert count_frames(clip) == 6


def test_a_name_that_looks_like_a_protocol_is_a_local_file(
    tmp_path: Path, short_real_video: Path
) -> None:
    odd = tmp_path / "concat:http:clip.mp4"
    shutil.copy(short_real_video, odd)
    assert count_frames(odd) == 32
    frame = next(iter_frames(odd))
    assert frame.shape == (256, 340, 3) and frame.dtype == np.uint8


def test_extract_records_each_refused_file_with_its_reason(
    tmp_path: Path,
    short_real_video: Path,
    playlist_beside_a_clip: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    png = write_png(tmp_path / "still.mp4")
    store = tmp_path / "s"
    code = main(
        [
            "extract",
            str(short_real_video),
            str(png),
            str(playlist_beside_a_clip),
            "--store",
            str(store),
            "--weights",
            "random",
            "--arch",
            "resnet18",
            "--streams",
            "appearance",
            "--max-frames",
            "4",
            "--no-progress",
        ]
    )
    assert code == 1
    out = capsys.readouterr().out
    assert "2 failed" in out and str(png) in out and str(playlist_beside_a_clip) in out
    s = FeatureStore.open(store, "r")
    assert len(s.videos()) == 1
    errors = {str(a["error"]) for v in s.videos(status="failed") for a in [s.video_attrs(v)]}
    assert any("png_pipe" in e and str(png) in e for e in errors)
    assert any("concat playlist" in e for e in errors)
