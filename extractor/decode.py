"""Decoding: every frame of a file's first video stream, in presentation order, at its native rate.

No resampling, no frame dropping: ``T`` is the number of frames the decoder returns. A file that
cannot give its frames is a :class:`VideoError` whose message names the file and the problem:

- the path is missing, is a directory, or is an empty (zero-byte) file;
- the container cannot be opened (not a video, e.g. a text file named ``.mp4``; an unknown
  container; an MP4 cut short before its index);
- the container has no video stream (e.g. audio only);
- decoding fails before a single frame;
- **truncation**: decoding fails part-way (a decode error after some frames), or the container
  declares a frame count and decoding stops well short of it (AVI files cut short end silently).
  The whole video then fails: features of a partial video would silently stand for the whole.
  A shortfall of up to ``max(2, 1%)`` of the declared count is tolerated with a warning, because
  some containers count frames the decoder legitimately drops (e.g. before an MP4 edit list).

Only video containers are opened, and only as local files or Python file objects: FFmpeg is told
to use the demuxers in :data:`VIDEO_DEMUXERS` and no protocol but ``file`` (none at all for a file
object). A URL (``s3://...``, see :mod:`extractor.urls`) is opened through fsspec and handed over
as a file object under the same demuxer allowlist, so FFmpeg never sees the URL. An image (PNG,
JPEG, GIF, ...), a playlist (ffconcat, HLS) or any other format FFmpeg knows is an
:class:`UnsupportedFormat` whatever the file is called, so a crafted upload cannot make FFmpeg
read other files or URLs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np
from av.video.reformatter import VideoReformatter

from extractor.urls import VideoPath, is_url, local_or_url, open_url, url_info

log = logging.getLogger(__name__)


class VideoError(ValueError):
    """A video file that cannot be decoded; the message names the file and the problem."""


class UnsupportedFormat(VideoError):
    """A file FFmpeg could read but that is not a video container framepool accepts."""


class VideoTooLarge(VideoError):
    """A video with more frames, or larger frames, than a caller's limit."""


# FFmpeg demuxer names (each matches the demuxer's whole name list, e.g. "mov" is
# "mov,mp4,m4a,3gp,3g2,mj2" and "matroska" is "matroska,webm").
VIDEO_DEMUXERS: tuple[str, ...] = ("mov", "matroska", "avi", "mpegts", "mpeg", "flv", "asf", "ogg")
ACCEPTED = "mp4/mov, matroska/webm, avi, mpeg-ts, mpeg-ps, flv, asf/wmv, ogg"
_OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(VIDEO_DEMUXERS)}
# a file object: FFmpeg reads through Python and may open nothing itself
_FILEOBJ_OPTIONS = {"protocol_whitelist": "none", "format_whitelist": ",".join(VIDEO_DEMUXERS)}
_PLAYLIST_HEADS = {b"ffconcat": "an FFmpeg concat playlist", b"#EXTM3U": "an M3U/HLS playlist"}


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream.

    ``n_frames_hint`` is the frame count the container declares (None when it declares none); the
    decoded count ``T`` is the truth and can differ.
    """

    fps: float
    width: int
    height: int
    codec: str
    n_frames_hint: int | None


def _check_path(path: VideoPath) -> None:
    if is_url(path):
        try:
            info = url_info(str(path))
        except (OSError, ValueError, ImportError) as exc:
            raise VideoError(f"{str(path)!r}: cannot be opened: {exc}") from exc
        if info is None:
            raise VideoError(f"{str(path)!r}: no such file")
        if info.get("type") == "directory":
            raise VideoError(f"{str(path)!r}: is a directory, not a video file")
        if not info.get("size"):
            raise VideoError(f"{str(path)!r}: empty file (0 bytes)")
        return
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{str(path)!r}: no such file")
    if path.is_dir():
        raise VideoError(f"{str(path)!r}: is a directory, not a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{str(path)!r}: empty file (0 bytes)")


def _is_video_demuxer(name: str) -> bool:
    return any(n in VIDEO_DEMUXERS for n in name.split(","))


def _open_bytes(path: VideoPath) -> Any:
    """A binary file object on ``path`` (through fsspec for a URL)."""
    return open_url(str(path)) if is_url(path) else Path(path).open("rb")


def _detected_format(path: VideoPath) -> str | None:
    """What FFmpeg takes ``path`` for, found without letting it open anything else: the file is
    handed over as a Python file object and every protocol is refused. None when even that fails
    (a playlist's demuxer fails opening its first entry)."""
    try:
        with (
            _open_bytes(path) as fh,
            av.open(fh, mode="r", options={"protocol_whitelist": "none"}) as container,
        ):
            return str(container.format.name)
    except (av.error.FFmpegError, OSError):
        return None


def _refusal(path: VideoPath) -> str | None:
    """Why ``path`` is not an accepted container, or None when it seems to be one."""
    with _open_bytes(path) as fh:
        head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    for magic, what in _PLAYLIST_HEADS.items():
        if head.startswith(magic):
            return what
    name = _detected_format(path)
    if name is None:
        return "a format that refers to other files (a playlist?) or none FFmpeg can open"
    if _is_video_demuxer(name):
        return None
    return f"FFmpeg reads it as {name!r}"


@contextlib.contextmanager
def _open(path: VideoPath) -> Iterator[av.container.InputContainer]:
    """The open container of an accepted video file (closed on exit); :class:`VideoError`
    naming ``path`` otherwise. A URL is read through an fsspec file object."""
    _check_path(path)
    with contextlib.ExitStack() as stack:
        if is_url(path):
            try:
                fh = stack.enter_context(open_url(str(path)))
            except OSError as exc:
                raise VideoError(f"{str(path)!r}: cannot be opened: {exc}") from exc
            container = _open_container(path, fh, _FILEOBJ_OPTIONS)
        else:
            # "file:" so that no part of the name is taken for a protocol ("concat:", "http:")
            container = _open_container(path, f"file:{path}", _OPEN_OPTIONS)
        with container:
            yield container


def _open_container(
    path: VideoPath, source: Any, options: dict[str, str]
) -> av.container.InputContainer:
    try:
        container = av.open(source, mode="r", options=dict(options))
    except av.error.FFmpegError as exc:
        # A demuxer outside the allowlist is refused with EINVAL before it reads its header
        why = _refusal(path) if isinstance(exc, av.error.ArgumentError) else None
        if why is not None:
            raise UnsupportedFormat(
                f"{str(path)!r}: not an accepted video container ({why}); accepted: {ACCEPTED}"
            ) from None
        raise VideoError(
            f"{str(path)!r}: cannot be read as a video: not a video, an unrecognised container, "
            f"or a damaged file ({_ffmpeg_reason(exc)})"
        ) from exc
    except UnicodeDecodeError:  # PyAV decodes the container's metadata strings as UTF-8
        raise VideoError(
            f"{str(path)!r}: cannot be read as a video: its metadata is damaged (not UTF-8)"
        ) from None
    if not _is_video_demuxer(str(container.format.name)):  # the allowlist held; belt and braces
        container.close()
        raise UnsupportedFormat(
            f"{str(path)!r}: not an accepted video container (FFmpeg reads it as "
            f"{container.format.name!r}); accepted: {ACCEPTED}"
        )
    return container


def _ffmpeg_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":", 1)[0].strip() or type(exc).__name__


def _video_stream(container: av.container.InputContainer, path: VideoPath) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({str(s.type) for s in container.streams}) or ["none"]
        raise VideoError(
            f"{str(path)!r}: no video stream (container {container.format.name!r} has "
            f"{', '.join(kinds)} streams)"
        )
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a damaged header: FFmpeg found no codec for the stream
        raise VideoError(
            f"{str(path)!r}: the video stream has no decoder (unknown or damaged codec parameters)"
        )
    return stream


def _fps(stream: av.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(Fraction(rate))
    return math.nan


def _info(stream: av.VideoStream) -> VideoInfo:
    frames = int(stream.frames or 0)
    return VideoInfo(
        fps=_fps(stream),
        width=int(stream.codec_context.width),
        height=int(stream.codec_context.height),
        codec=str(stream.codec_context.name),
        n_frames_hint=frames if frames > 0 else None,
    )


def probe(path: str | Path) -> VideoInfo:
    """The first video stream's rate, size, codec and declared frame count, without decoding."""
    p = local_or_url(path)
    with _open(p) as container:
        return _info(_video_stream(container, p))


def truncation_tolerance(declared: int) -> int:
    """How many fewer frames than declared are accepted before a video counts as truncated."""
    return max(2, declared // 100)


def check_frame_count(path: VideoPath, decoded: int, declared: int | None) -> None:
    """Raise :class:`VideoError` when a video decoded to more than
    :func:`truncation_tolerance` fewer frames than its container declares (``declared``: 0 or
    None when it declares none); a smaller shortfall is logged."""
    if not declared or decoded >= declared:
        return
    if declared - decoded > truncation_tolerance(declared):
        raise VideoError(
            f"{str(path)!r}: truncated: decoded {decoded} of the {declared} frames the container "
            "declares"
        )
    log.warning("%s: decoded %d of %d declared frames", path, decoded, declared)


def _decode(p: VideoPath, threads: bool) -> Iterator[av.VideoFrame]:
    with _open(p) as container:
        stream = _video_stream(container, p)
        if threads:
            stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        n = 0
        try:
            for frame in container.decode(stream):
                yield frame
                n += 1
        except av.error.FFmpegError as exc:
            if n == 0:
                raise VideoError(
                    f"{str(p)!r}: undecodable video stream ({_ffmpeg_reason(exc)})"
                ) from exc
            raise VideoError(
                f"{str(p)!r}: truncated or corrupt: decoding failed after {n} frames "
                f"({_ffmpeg_reason(exc)})"
            ) from exc
    if n == 0:
        raise VideoError(f"{str(p)!r}: the video stream has no decodable frames")
    check_frame_count(p, n, declared)


def iter_frames(path: str | Path, *, threads: bool = True) -> Iterator[np.ndarray]:
    """Yield every frame of the first video stream as an ``[H, W, 3]`` uint8 RGB array.

    Frames come in presentation order (the decoder reorders B-frames). Raises :class:`VideoError`
    on any of the problems listed in this module's docstring; it may do so after having yielded
    frames (truncation), in which case the caller must discard what it got.
    ``threads`` lets FFmpeg decode with its own frame/slice threads.
    """
    rgb = VideoReformatter()  # one cached conversion context for the whole video
    for frame in _decode(local_or_url(path), threads):
        yield rgb.reformat(frame, format="rgb24").to_ndarray()


def count_frames(path: str | Path) -> int:
    """The number of frames :func:`iter_frames` yields (a full decode; raises like it)."""
    return sum(1 for _ in _decode(local_or_url(path), True))


def count_packets(path: str | Path) -> int:
    """The frames of the first video stream as the demuxer counts them: its packets, without
    decoding one (cheap: it reads the file, it does not run the codec).

    Every packet that is not empty and not marked for discarding (an MP4 edit list's) holds one
    frame for the codecs and containers framepool reads, so this equals the number of frames
    :func:`iter_frames` yields on every real clip checked; a caller that needs the exact count
    compares it with the decoded one at the end (:mod:`extractor.prepare` does). Raises
    :class:`VideoError` like :func:`probe`; a container damaged part-way counts the packets
    before the damage (decoding it then fails with the reason).
    """
    p = local_or_url(path)
    n = 0
    with _open(p) as container:
        stream = _video_stream(container, p)
        try:
            for packet in container.demux(stream):
                if packet.size and not packet.is_discard:
                    n += 1
        except av.error.FFmpegError as exc:  # decoding meets the same damage and says so
            log.debug("%s: demuxing stopped after %d packets (%s)", p, n, _ffmpeg_reason(exc))
    return n


@dataclass(frozen=True)
class FrameTimes:
    """Presentation times of every frame :func:`iter_frames` yields, in seconds.

    ``seconds[t]`` is frame t's time: the container's presentation timestamps (``pts`` x
    ``time_base``, as FFmpeg reports them on the decoded frames) in increasing order. Decoders
    hand frames out in presentation order; AVI files carry decode-order stamps only, and frames
    reordered from B-frames come out with their stamps permuted (pts 1, 2, 4, 3, ... on the
    shipped AVI clips), so the t-th frame gets the t-th smallest stamp. A frame without a stamp is
    placed ``1 / fps`` after the frame before it and counted in ``estimated``.
    """

    seconds: np.ndarray  # float64 [T]
    estimated: int = 0


def frame_times(path: str | Path, *, threads: bool = True) -> FrameTimes:
    """The :class:`FrameTimes` of ``path`` (a decode without colour conversion; raises like
    :func:`iter_frames`)."""
    p = local_or_url(path)
    fps = probe(p).fps
    return times_from_stamps([frame.time for frame in _decode(p, threads)], fps)


def times_from_stamps(stamps: list[float | None], fps: float) -> FrameTimes:
    """:class:`FrameTimes` from the decoded frames' stamps in the order the decoder gave them
    (None: a frame without one, placed ``1 / fps`` after the one before)."""
    step = 1.0 / fps if fps > 0 else math.nan
    out: list[float] = []
    estimated = 0
    for t in stamps:
        if t is None:
            estimated += 1
            t = out[-1] + step if out and math.isfinite(step) else 0.0
        out.append(float(t))
    return FrameTimes(np.sort(np.asarray(out, dtype=np.float64)), estimated)


def iter_timed_frames(
    path: str | Path, stamps: list[float | None], *, threads: bool = True
) -> Iterator[np.ndarray]:
    """:func:`iter_frames` that also appends each frame's presentation stamp in seconds (None
    when it has none) to ``stamps``: the times come from the same decode
    (:func:`times_from_stamps` turns them into :class:`FrameTimes`)."""
    rgb = VideoReformatter()
    for frame in _decode(local_or_url(path), threads):
        stamps.append(frame.time)
        yield rgb.reformat(frame, format="rgb24").to_ndarray()
