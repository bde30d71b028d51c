from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extractor.decode import iter_frames, probe
from extractor.sources import make_sources
from extractor.synthetic import make_demo_clips, render_clip


def test_clips_are_written_decodable_and_labelled_by_folder(tmp_path: Path) -> None:
    clips = make_demo_clips(tmp_path, n_per_class=2, n_frames=12, size=(64, 48))
    assert [label for _, label in clips] == ["left_then_right"] * 2 + ["right_then_left"] * 2
    for path, label in clips:
        assert path.parent.name == label
        info = probe(path)
        assert (info.width, info.height, info.fps) == (64, 48, 25.0)
        assert len(list(iter_frames(path))) == 12
    sources = make_sources([tmp_path])
    assert sorted((s.path, s.label) for s in sources) == [(p.resolve(), c) for p, c in clips]
    again = make_demo_clips(tmp_path / "again", n_per_class=2, n_frames=12, size=(64, 48))
    for (a, _), (b, _) in zip(clips, again, strict=True):  # same arguments, same clips
        np.testing.assert_array_equal(
            np.stack(list(iter_frames(a))), np.stack(list(iter_frames(b)))
        )


@pytest.mark.parametrize(
    ("a", "b"), [("left_then_right", "right_then_left"), ("up_then_down", "down_then_up")]
)
def test_classes_differ_only_in_temporal_order(a: str, b: str) -> None:
    t = 16
    kw = {"n_frames": t, "width": 96, "height": 64, "noise": False}
    x = render_clip(a, np.random.default_rng(5), **kw).astype(np.int64)  # type: ignore[arg-type]
    y = render_clip(b, np.random.default_rng(5), **kw).astype(np.int64)  # type: ignore[arg-type]
    # the same frames, half a period apart: equal global averages, different halves
    np.testing.assert_array_equal(np.roll(x, t // 2, axis=0), y)
    np.testing.assert_array_equal(x.mean(0), y.mean(0))
    assert np.abs(x[: t // 2].mean(0) - y[: t // 2].mean(0)).max() > 20
    # the object moves (it may pause a frame at the turning points)
    assert sum(np.abs(x[i + 1] - x[i]).max() > 20 for i in range(t - 1)) >= t - 3


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'spin'"):
        make_demo_clips(tmp_path, classes=["spin"])
    with pytest.raises(ValueError, match="even"):
        make_demo_clips(tmp_path, size=(65, 64))


def test_resting_clips_are_the_other_class_with_excursions_swapped() -> None:
    rest, t = 10, 46  # two excursions of 8 frames
    kw = {"n_frames": t, "width": 96, "height": 64, "noise": False, "rest": rest}
    x = render_clip("left_then_right", np.random.default_rng(3), **kw).astype(np.int64)  # type: ignore[arg-type]
    y = render_clip("right_then_left", np.random.default_rng(3), **kw).astype(np.int64)  # type: ignore[arg-type]
    e = (t - 3 * rest) // 2
    first, second = slice(rest, rest + e), slice(2 * rest + e, 2 * rest + 2 * e)
    swapped = x.copy()
    swapped[first], swapped[second] = x[second], x[first]
    np.testing.assert_array_equal(swapped, y)
    # still at both ends and between the excursions: equal frames there, in both classes
    still = [*range(rest), *range(rest + e, 2 * rest + e), *range(2 * rest + 2 * e, t)]
    for i in still:
        np.testing.assert_array_equal(x[i], x[0])
        np.testing.assert_array_equal(y[i], x[0])
    assert np.abs(x[first].mean(0) - y[first].mean(0)).max() > 20  # the order differs


def test_rest_needs_room(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_frames >= 38"):
        make_demo_clips(tmp_path, n_frames=32, rest=10)
