"""Small JPEG thumbnails of the frames a head uses, for the page that shows what it saw.

The frames used are those of the prediction: every ``stride``-th decoded frame, at most
``max_frames`` of them evenly spread (:func:`extractor.prepare.select_frames`). Of those,
``count`` evenly spread ones are decoded again and shrunk to ``height`` pixels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from api.service.served_runs import JobControl, JobStopped, Limits


@dataclass(frozen=True)
class Thumbnail:
    frame: int  # index among the decoded frames
    time_s: float | None  # frame / fps
    jpeg: bytes


@dataclass(frozen=True)
class FrameStrip:
    """The frames a head uses out of one video, and thumbnails of some of them."""

    n_frames: int
    used: list[int]
    fps: float | None
    width: int
    height: int
    thumbnails: list[Thumbnail]


def spread(used: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` entries of ``used``, evenly spread, first and last included."""
    if len(used) <= count:
        return used
    return used[np.unique(np.round(np.linspace(0, len(used) - 1, count)).astype(np.int64))]


def encode_jpeg(frame: np.ndarray, height: int, quality: int = 75) -> bytes:
    """``frame [H, W, 3]`` uint8 RGB shrunk to ``height`` pixels (aspect kept) as JPEG."""
    from PIL import Image

    image = Image.fromarray(frame)
    width = max(1, round(image.width * height / image.height))
    image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def frame_strip(
    path: Path,
    *,
    stride: int,
    max_frames: int | None,
    count: int,
    height: int,
    limits: Limits | None = None,
    control: JobControl | None = None,
) -> FrameStrip:
    """Which frames of ``path`` a head uses (``stride``, ``max_frames``), with ``count``
    thumbnails ``height`` pixels high among them.

    Runs in an inference worker: a first pass counts the frames within ``limits`` (raising
    ``VideoTooLarge``), a second decodes up to the last thumbnail. Raises the decoder's
    ``VideoError`` for a file it cannot read and :class:`JobStopped` when ``control`` stops.
    """
    from extractor.decode import VideoTooLarge, count_packets, iter_frames, probe
    from extractor.prepare import select_frames

    control = control or JobControl()
    control.start()
    info = probe(path)
    n = count_packets(path)  # the demuxer's count, as predict selects its frames
    if limits is not None and n > limits.max_decoded_frames:
        raise VideoTooLarge(
            f"{str(path)!r}: {n} frames, more than the limit of {limits.max_decoded_frames} frames"
        )
    if limits is not None and info.width * info.height > limits.max_frame_pixels:
        raise VideoTooLarge(
            f"{str(path)!r}: frames of {info.width}x{info.height} pixels, more than the limit of "
            f"{limits.max_frame_pixels}"
        )
    used = select_frames(n, stride, max_frames)
    wanted = spread(used, count)
    fps = float(info.fps) if math.isfinite(info.fps) and info.fps > 0 else None
    thumbs: list[Thumbnail] = []
    todo = set(wanted.tolist())
    for t, frame in enumerate(iter_frames(path)):
        if control.should_stop():
            raise JobStopped(control.reason or "stopped")
        if t in todo:
            time_s = t / fps if fps else None
            thumbs.append(Thumbnail(frame=t, time_s=time_s, jpeg=encode_jpeg(frame, height)))
            if len(thumbs) == len(todo):
                break
    return FrameStrip(
        n_frames=n,
        used=[int(i) for i in used],
        fps=fps,
        width=int(info.width),
        height=int(info.height),
        thumbnails=thumbs,
    )
