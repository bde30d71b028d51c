from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from extractor.decode import iter_frames
from extractor.flow import make_flow
from extractor.prepare import FrameChunk, VideoDone, prepare_video, select_frames
from extractor.transforms import (
    center_crop,
    motion_stacks,
    quantize_flow,
    resize_shorter,
    to_gray,
)
from tests.extractor.conftest import textured_frames, write_clip


def _collect(items: list[FrameChunk | VideoDone]) -> tuple[dict[str, np.ndarray], VideoDone]:
    chunks = [c for c in items if isinstance(c, FrameChunk)]
    done = items[-1]
    assert isinstance(done, VideoDone) and all(isinstance(c, FrameChunk) for c in items[:-1])
    out = {"indices": np.concatenate([c.indices for c in chunks])}
    if chunks[0].appearance is not None:
        out["appearance"] = np.concatenate([c.appearance for c in chunks])  # type: ignore[misc]
    if chunks[0].motion is not None:
        out["motion"] = np.concatenate([c.motion for c in chunks])  # type: ignore[misc]
    return out, done


def _offline(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All frames at once: crops [T, 224, 224, 3] and stacks [T, 224, 224, 20] (the slow way)."""
    resized = [resize_shorter(f)[0].numpy() for f in iter_frames(path)]
    crops = np.stack([center_crop(r) for r in resized])
    grays = [to_gray(r) for r in resized]
    dis = make_flow("dis")
    if len(grays) == 1:
        fields = np.full((1, 224, 224, 2), 128, np.uint8)
    else:
        fields = np.stack(
            [quantize_flow(center_crop(dis(a, b))) for a, b in itertools.pairwise(grays)]
        )
    return crops, motion_stacks(fields, np.arange(len(grays)))


def test_streamed_inputs_equal_the_offline_computation(short_real_video: Path) -> None:
    crops, stacks = _offline(short_real_video)
    got, done = _collect(list(prepare_video(short_real_video, flow=make_flow("dis"), chunk_size=5)))
    assert done.n_frames == 32 == len(crops)
    np.testing.assert_array_equal(got["indices"], np.arange(32))
    np.testing.assert_array_equal(done.frame_indices, np.arange(32))
    np.testing.assert_array_equal(got["appearance"], crops)
    np.testing.assert_array_equal(got["motion"], stacks)
    assert (done.width, done.height, done.codec) == (340, 256, "h264")

    sub, done = _collect(
        list(prepare_video(short_real_video, flow=make_flow("dis"), stride=3, max_frames=6))
    )
    keep = select_frames(32, 3, 6)
    assert keep.tolist() == [0, 6, 12, 18, 24, 30]
    np.testing.assert_array_equal(sub["indices"], keep)
    np.testing.assert_array_equal(done.frame_indices, keep)
    np.testing.assert_array_equal(sub["appearance"], crops[keep])
    np.testing.assert_array_equal(sub["motion"], stacks[keep])

    only, _ = _collect(list(prepare_video(short_real_video, streams=("appearance",), stride=12)))
    assert "motion" not in only
    np.testing.assert_array_equal(only["appearance"], crops[[0, 12, 24]])


def test_long_clip_and_sparse_frames(real_videos: list[Path]) -> None:
    # 164 frames: more fields than the window holds at once, so it must slide
    clip = next(p for p in real_videos if p.name == "mm_test.avi")
    crops, stacks = _offline(clip)
    got, done = _collect(list(prepare_video(clip, flow=make_flow("dis"), chunk_size=16)))
    assert done.n_frames == 164
    np.testing.assert_array_equal(got["motion"], stacks)
    np.testing.assert_array_equal(got["appearance"], crops)
    # stride 12 > L: only the fields some kept frame needs are computed, the last padded
    for stride, max_frames in ((12, None), (1, 9), (7, 3)):
        sub, done = _collect(
            list(prepare_video(clip, flow=make_flow("dis"), stride=stride, max_frames=max_frames))
        )
        keep = select_frames(164, stride, max_frames)
        assert keep[-1] >= 154  # the last kept frames need the end padding
        np.testing.assert_array_equal(sub["indices"], keep)
        np.testing.assert_array_equal(sub["motion"], stacks[keep])


@pytest.mark.parametrize("n", [1, 2, 11])
def test_short_videos(tmp_path: Path, n: int) -> None:
    clip = write_clip(tmp_path / f"n{n}.avi", textured_frames(n, 96, 128))
    crops, stacks = _offline(clip)
    got, done = _collect(list(prepare_video(clip, flow=make_flow("dis"), chunk_size=4)))
    assert done.n_frames == n
    np.testing.assert_array_equal(got["motion"], stacks)
    np.testing.assert_array_equal(got["appearance"], crops)
    if n == 1:
        assert np.all(got["motion"] == 128)  # a one-frame video has zero flow
    else:  # the texture moves right: dx > 0 somewhere, the last field fills the end
        assert got["motion"][..., 0].mean() > 128
        np.testing.assert_array_equal(got["motion"][-1][..., 0:2], got["motion"][-1][..., 18:20])


def test_selection_rules() -> None:
    assert select_frames(10).tolist() == list(range(10))
    assert select_frames(10, 4).tolist() == [0, 4, 8]
    assert select_frames(100, 1, 3).tolist() == [0, 50, 99]
    assert select_frames(2, 1, 5).tolist() == [0, 1]
    with pytest.raises(ValueError, match="stride"):
        select_frames(10, 0)
    with pytest.raises(ValueError, match="max_frames"):
        select_frames(10, 1, 0)
