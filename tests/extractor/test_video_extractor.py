"""Both extractors, frame and window backbones, take the protocol's ``extract_file`` arguments with
the protocol's defaults, and have every member the protocol names."""

from __future__ import annotations

import inspect

import pytest

from extractor.features import FeatureExtractor
from extractor.video_extractor import VideoExtractor
from extractor.windows import WindowExtractor


def _keywords(func: object) -> dict[str, object]:
    params = inspect.signature(func).parameters.values()  # type: ignore[arg-type]
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("cls", [FeatureExtractor, WindowExtractor])
def test_extract_file_takes_the_protocols_arguments(cls: type) -> None:
    wanted = _keywords(VideoExtractor.extract_file)
    assert set(wanted) == {
        "stride",
        "max_frames",
        "should_stop",
        "maps",
        "max_decoded_frames",
        "max_frame_pixels",
    }
    got = _keywords(cls.extract_file)
    assert {k: got.get(k, "missing") for k in wanted} == wanted
    first = list(inspect.signature(cls.extract_file).parameters)[1]
    assert first == "path"


def test_members_are_checked_at_run_time() -> None:
    class Partial:
        streams = ("appearance",)

        def extract_file(self, path: str) -> None: ...

    class Whole(Partial):
        map_streams = ()

        def config(self) -> dict[str, dict[str, object]]:
            return {}

    assert not isinstance(Partial(), VideoExtractor)
    assert isinstance(Whole(), VideoExtractor)
