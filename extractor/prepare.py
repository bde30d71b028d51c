"""One video -> model-ready uint8 inputs, streamed in chunks of frames.

Decoding, resizing, flow and stacking happen here, frame by frame, holding only what the next
stacks need (the last L flow fields), so a long video never sits in memory. Yields
:class:`FrameChunk` items (the frames' appearance crops and motion stacks, still uint8) and ends
with one :class:`VideoDone` that says how many frames the video had.

Frame selection: every frame by default. ``stride`` keeps frames 0, s, 2s, ...; ``max_frames``
then keeps at most that many of them, evenly spaced (first and last included), which needs the
frame count before decoding: the demuxer's packet count (:func:`extractor.decode.count_packets`,
no decoding), so a video is decoded once. Where the decoded count turns out different and the
selection depends on it, :class:`FrameCountChanged` says so at the end and the caller decodes
again with the true count (:class:`~extractor.features.FeatureExtractor` does). ``sample_fps`` F
instead keeps, for each instant ``t0 + k / F`` (``t0`` the first frame's time, up to the last
frame's), the frame shown at that instant: the last one whose presentation time is at most the
instant (:func:`select_at_fps`), so a frame shown at several instants is kept for each. Every
kept frame's presentation time is recorded: read in the same decode with PyAV; from a timing
pass first (:func:`extractor.decode.frame_times`, a decode without colour conversion) when the
selection needs all times before the frames (``sample_fps``) or another decoder reads the
frames. The motion stack of a kept frame t is still built from the flow between consecutive
decoded frames t, t+1, ..., t+L; only the fields some kept frame needs are computed.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extractor.decode import (
    FrameTimes,
    VideoError,
    VideoInfo,
    VideoTooLarge,
    count_packets,
    frame_times,
    iter_frames,
    iter_timed_frames,
    probe,
    times_from_stamps,
)
from extractor.decode_torchcodec import FrameReader
from extractor.flow import FlowBackend
from extractor.transforms import (
    CROP_SIZE,
    DEFAULT_APPEARANCE_INPUT,
    RESIZE_SHORTER,
    STACK_LENGTH,
    AppearanceInput,
    center_crop,
    center_crop_box,
    quantize_flow,
    resize_shorter,
    to_gray,
    zero_flow_field,
)
from extractor.urls import local_or_url


@dataclass
class FrameChunk:
    """Consecutive kept frames of one video, as uint8 model inputs.

    ``appearance``: ``[n, 224, 224, 3]`` RGB crops (another size for a backbone with its own
    :class:`~extractor.transforms.AppearanceInput`); ``motion``: ``[n, 224, 224, 20]`` flow stacks
    (channels interleaved dx, dy per field); either is None when its stream is not wanted.
    """

    indices: np.ndarray  # int64 [n], frame numbers in the video
    appearance: np.ndarray | None
    motion: np.ndarray | None

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class VideoDone:
    """The end of one video: what was decoded and which frames were kept."""

    n_frames: int
    frame_indices: np.ndarray  # int64 [n_kept]
    fps: float
    width: int
    height: int
    codec: str
    # presentation time in seconds of every kept frame (None: not measured)
    frame_times: np.ndarray | None = None
    times_estimated: int = 0  # frames without a timestamp among the video's frames


TIME_TOLERANCE = 1e-6  # seconds: a frame stamped this much after an instant still shows at it


def select_at_fps(times: np.ndarray, sample_fps: float) -> np.ndarray:
    """Indices of the frames shown at the instants ``t0 + k / sample_fps``, k = 0, 1, ...,
    while the instant is at most the last frame's time; ``times`` are the frames' increasing
    presentation times (``t0 = times[0]``). The frame shown at an instant is the last one whose
    time is at most the instant (within :data:`TIME_TOLERANCE`); a frame may be shown at several
    instants (``sample_fps`` above the video's rate) or at none (below it)."""
    if not (math.isfinite(sample_fps) and sample_fps > 0):
        raise ValueError(f"sample fps must be a positive number, got {sample_fps!r}")
    if len(times) == 0:
        return np.zeros(0, dtype=np.int64)
    t0 = float(times[0])
    n = math.floor((float(times[-1]) - t0) * sample_fps + TIME_TOLERANCE * sample_fps) + 1
    instants = t0 + np.arange(n, dtype=np.float64) / sample_fps
    return np.searchsorted(times, instants + TIME_TOLERANCE, side="right").astype(np.int64) - 1


class FrameCountChanged(VideoError):
    """The video decoded to another number of frames than its demuxer counted, and the frames
    ``max_frames`` keeps depend on that number: the chunks already given out are of the wrong
    frames. Decode again with ``n_frames=decoded``."""

    def __init__(self, path: str | Path, counted: int, decoded: int) -> None:
        super().__init__(
            f"{str(path)!r}: the demuxer counted {counted} frames but {decoded} decoded; the "
            "frames kept by max_frames need the decoded count"
        )
        self.counted = counted
        self.decoded = decoded


def select_frames(n_frames: int, stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """Frames kept out of ``n_frames``: every ``stride``-th, then at most ``max_frames`` of them."""
    check_selection(stride, max_frames)
    kept = np.arange(0, n_frames, stride, dtype=np.int64)
    if max_frames is not None and len(kept) > max_frames:
        pick = np.round(np.linspace(0, len(kept) - 1, max_frames)).astype(np.int64)
        kept = kept[pick]
    return kept


def check_selection(stride: int, max_frames: int | None) -> None:
    if stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")


def prepare_video(
    path: str | Path,
    *,
    streams: Sequence[str] = ("appearance", "motion"),
    flow: FlowBackend | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    chunk_size: int = 8,
    length: int = STACK_LENGTH,
    should_stop: Callable[[], bool] | None = None,
    appearance_input: AppearanceInput = DEFAULT_APPEARANCE_INPUT,
    read_frames: FrameReader | None = None,
    sample_fps: float | None = None,
    n_frames: int | None = None,
    max_decoded_frames: int | None = None,
    max_frame_pixels: int | None = None,
) -> Iterator[FrameChunk | VideoDone]:
    """Stream one video's kept frames as uint8 model inputs; the last item is a :class:`VideoDone`.

    ``appearance_input`` sets the appearance crops' geometry (a timm backbone's own); the motion
    stream always works at the resized 256 / crop 224 geometry.

    Raises :class:`extractor.decode.VideoError` (possibly after some chunks: discard them) when the
    file cannot be decoded in full. ``flow`` is required for the motion stream and is used from
    this thread only. ``should_stop`` is polled once per decoded frame to abandon the video early.
    ``read_frames`` decodes (default: PyAV, :func:`extractor.decode.iter_frames`); frames it yields
    on a CUDA device are resized there, and only the resized frame comes to host memory.
    ``sample_fps`` keeps the frames shown at a fixed rate (module docstring); it excludes
    ``stride`` and ``max_frames``.

    The video is decoded once (twice with ``sample_fps`` or a reader other than PyAV's: a timing
    pass first). ``n_frames`` is its frame count when the caller knows it exactly; otherwise
    ``max_frames`` selects by the demuxer's count and raises :class:`FrameCountChanged` at the end
    in the rare case where decoding disagrees with it. ``max_decoded_frames`` and
    ``max_frame_pixels`` bound untrusted input: :class:`extractor.decode.VideoTooLarge` before
    decoding when the demuxer counts more frames (or the container declares larger ones), and
    while decoding at the first frame past either limit (a stream may change size part-way).
    """
    check_selection(stride, max_frames)
    if sample_fps is not None and (stride != 1 or max_frames is not None):
        raise ValueError("sample_fps replaces stride and max_frames; give one or the other")
    if "motion" in streams and flow is None:
        raise ValueError("the motion stream needs a flow backend")
    info = probe(path)
    if max_frame_pixels is not None:
        _check_pixels(path, "declares frames of", info.width, info.height, max_frame_pixels)
    stamps: list[float | None] = []
    reader, ahead = _reader(path, read_frames, sample_fps, stamps)
    counted = _counted(path, n_frames, ahead, max_frames, max_decoded_frames)
    video = _VideoInputs(
        _frame_selector(ahead, counted, stride, max_frames, sample_fps),
        streams=streams,
        flow=flow,
        chunk_size=chunk_size,
        length=length,
        appearance_input=appearance_input,
    )
    n = 0
    for t, frame in enumerate(reader(local_or_url(path))):
        if should_stop is not None and should_stop():
            return
        _check_frame(path, t, frame, max_decoded_frames, max_frame_pixels)
        n = t + 1
        yield from video.add_frame(t, frame)
    if max_frames is not None and n_frames is None and ahead is None and n != counted:
        _check_count(path, n, counted or 0, stride, max_frames)
    times = ahead if ahead is not None else times_from_stamps(stamps, info.fps)
    if n != len(times.seconds):
        raise VideoError(
            f"{str(path)!r}: decoded {n} frames, but its timing pass found {len(times.seconds)}"
        )
    yield from video.finish(n)
    yield _video_done(n, np.array(video.kept, dtype=np.int64), info, times)


def _reader(
    path: str | Path,
    read_frames: FrameReader | None,
    sample_fps: float | None,
    stamps: list[float | None],
) -> tuple[FrameReader, FrameTimes | None]:
    """The frame reader of :func:`prepare_video` and the frames' times when a timing pass is
    needed first (``sample_fps``, or a reader other than PyAV's); else the reader records each
    frame's time in ``stamps`` as it decodes."""
    reader = read_frames or iter_frames
    if sample_fps is not None or reader is not iter_frames:
        return reader, frame_times(path)
    return functools.partial(iter_timed_frames, stamps=stamps), None


def _counted(
    path: str | Path,
    n_frames: int | None,
    ahead: FrameTimes | None,
    max_frames: int | None,
    max_decoded_frames: int | None,
) -> int | None:
    """The video's frame count as known before decoding (given, timed, or the demuxer's when
    ``max_frames`` or ``max_decoded_frames`` needs one); VideoTooLarge past the limit."""
    counted = n_frames
    if counted is None and ahead is not None:
        counted = len(ahead.seconds)
    if counted is None and (max_frames is not None or max_decoded_frames is not None):
        counted = count_packets(path)
    if max_decoded_frames is not None and counted is not None and counted > max_decoded_frames:
        raise VideoTooLarge(
            f"{str(path)!r}: {counted} frames, more than the limit of {max_decoded_frames} frames"
        )
    return counted


def _check_frame(
    path: str | Path,
    t: int,
    frame: Any,  # [H, W, 3]: a numpy array, or a torch tensor on the decoding device
    max_decoded_frames: int | None,
    max_frame_pixels: int | None,
) -> None:
    """VideoTooLarge when decoded frame ``t`` is past either limit of :func:`prepare_video`."""
    if max_decoded_frames is not None and t >= max_decoded_frames:
        raise VideoTooLarge(f"{str(path)!r}: more than the limit of {max_decoded_frames} frames")
    if max_frame_pixels is not None:
        height, width = int(frame.shape[0]), int(frame.shape[1])
        _check_pixels(path, f"frame {t} is", width, height, max_frame_pixels)


def _check_count(
    path: str | Path, decoded: int, counted: int, stride: int, max_frames: int
) -> None:
    """FrameCountChanged when the frames ``max_frames`` keeps out of the ``decoded`` frames are
    not those it kept out of the ``counted`` ones (the chunks given out are then wrong)."""
    if not np.array_equal(
        select_frames(decoded, stride, max_frames), select_frames(counted, stride, max_frames)
    ):
        raise FrameCountChanged(path, counted, decoded)


def _video_done(n: int, kept: np.ndarray, info: VideoInfo, times: FrameTimes) -> VideoDone:
    """The end record of a video of ``n`` decoded frames, ``kept`` of them kept."""
    return VideoDone(
        n_frames=n,
        frame_indices=kept,
        fps=info.fps,
        width=info.width,
        height=info.height,
        codec=info.codec,
        frame_times=times.seconds[kept],
        times_estimated=times.estimated,
    )


def _frame_selector(
    times: FrameTimes | None,
    counted: int | None,
    stride: int,
    max_frames: int | None,
    sample_fps: float | None,
) -> Callable[[int], int]:
    """How many times frame ``t`` is kept (0: dropped); ``times`` are needed for ``sample_fps``,
    the frame count ``counted`` for ``max_frames``."""
    if sample_fps is not None:
        assert times is not None
        counts = np.bincount(select_at_fps(times.seconds, sample_fps), minlength=len(times.seconds))
        return lambda t: int(counts[t]) if t < len(counts) else 0
    if max_frames is not None:
        assert counted is not None
        kept = set(select_frames(counted, stride, max_frames).tolist())
        return lambda t: int(t in kept)
    return lambda t: int(t % stride == 0)


def _check_pixels(path: str | Path, what: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise VideoTooLarge(
            f"{str(path)!r}: {what} {width}x{height} = {width * height} pixels, more than the "
            f"limit of {limit}"
        )


class _VideoInputs:
    """One video's inputs in the making, fed frame by frame.

    Holds the kept frames still waiting for their flow stacks, the last two grayscale frames, the
    recent flow fields and the chunk being filled; :meth:`add_frame` and :meth:`finish` yield
    every chunk as soon as it is full.
    """

    def __init__(
        self,
        selected: Callable[[int], int],
        *,
        streams: Sequence[str],
        flow: FlowBackend | None,
        chunk_size: int,
        length: int,
        appearance_input: AppearanceInput,
    ) -> None:
        self.selected = selected
        self.want_app = "appearance" in streams
        self.want_motion = "motion" in streams
        self.flow = flow
        self.length = length
        self.appearance_input = ai = appearance_input
        self.own_geometry = (ai.resize_shorter, ai.crop_size, ai.interpolation) != (
            RESIZE_SHORTER,
            CROP_SIZE,
            "bilinear",
        )
        self.window = _FieldWindow(CROP_SIZE, length)
        self.pending: deque[tuple[int, np.ndarray | None]] = deque()  # kept, awaiting a stack
        self.ready = _ChunkBuilder(
            chunk_size,
            want_app=self.want_app,
            want_motion=self.want_motion,
            length=length,
            app_size=ai.crop_size,
        )
        self.grays: deque[np.ndarray] = deque(maxlen=2)  # the last two grayscale frames
        self.crop_box: tuple[int, int] | None = None
        self.kept: list[int] = []
        self.last_computed = -1  # highest flow field index computed so far

    def add_frame(self, t: int, frame: Any) -> Iterator[FrameChunk]:
        """Take decoded frame ``t``; yield the chunks it completes."""
        keep = self.selected(t)  # times kept (a frame shown at several sampled instants)
        resized = self._resized(frame)
        app = self._appearance(frame, resized) if self.want_app and keep else None
        self.kept.extend([t] * keep)
        if not self.want_motion:
            for _ in range(keep):
                self.ready.add(t, app, None)
                yield from self._flush()
            return
        assert resized is not None
        self.grays.append(to_gray(resized))
        if keep:  # the crop waits up to L frames for its stack: hold a copy, not a view
            held = None if app is None else app.copy()
            self.pending.extend([(t, held)] * keep)
        if t >= 1 and self._field_needed(t - 1):
            self._put_field(t - 1)
        # frame t0's stack is complete once field t0 + L - 1 exists, i.e. at frame t0 + L
        yield from self._stack_pending(until=t)
        yield from self._flush()

    def finish(self, n_frames: int) -> Iterator[FrameChunk]:
        """After the last of ``n_frames`` frames: complete the waiting stacks, yield the rest."""
        if self.want_motion and self.pending:
            last_field = max(n_frames - 2, 0)  # fields 0 .. T-2; the last repeats past the end
            keep_from = min(self.pending[0][0], last_field)
            if n_frames == 1:
                self.window.put(0, zero_flow_field(CROP_SIZE, CROP_SIZE), keep_from=0)
            elif self.last_computed != last_field:
                self._put_field(last_field)
            self.window.repeat_after(last_field, keep_from=keep_from)
            yield from self._stack_pending(until=None)
        yield from self._flush(final=True)

    def _resized(self, frame: Any) -> np.ndarray | None:
        """The frame at the motion geometry (shorter side 256), when flow or the crop needs it."""
        if not self.want_motion and self.own_geometry:
            return None
        resized: np.ndarray = resize_shorter(frame)[0].cpu().numpy()  # [h, w, 3] uint8
        if self.crop_box is None:
            self.crop_box = center_crop_box(resized.shape[0], resized.shape[1])
        return resized

    def _appearance(self, frame: Any, resized: np.ndarray | None) -> np.ndarray:
        """The appearance crop (a view, copied once into the chunk)."""
        if self.own_geometry:
            ai = self.appearance_input
            src = resize_shorter(frame, ai.resize_shorter, ai.interpolation)[0].cpu().numpy()
            return np.asarray(center_crop(src, ai.crop_size))
        assert resized is not None
        return np.asarray(center_crop(resized))

    def _field_needed(self, i: int) -> bool:
        """Whether some kept frame's stack covers flow field ``i``."""
        return any(self.selected(t) for t in range(max(0, i - self.length + 1), i + 1))

    def _put_field(self, i: int) -> None:
        """Compute flow field ``i`` from the last two grayscale frames into the window."""
        assert self.flow is not None and self.crop_box is not None
        field = _flow_field(self.flow, self.grays[0], self.grays[1], self.crop_box)
        keep_from = min(self.pending[0][0], i) if self.pending else i
        self.window.put(i, field, keep_from=keep_from)
        self.last_computed = i

    def _stack_pending(self, until: int | None) -> Iterator[FrameChunk]:
        """Move the waiting frames whose stacks are complete by frame ``until`` (None: all)."""
        while self.pending and (until is None or self.pending[0][0] + self.length <= until):
            t0, app = self.pending.popleft()
            self.ready.add(t0, app, self.window.stack_view(t0))
            yield from self._flush()

    def _flush(self, final: bool = False) -> Iterator[FrameChunk]:
        if self.ready.full() or (final and self.ready.count):
            yield self.ready.take()


class _FieldWindow:
    """Recent quantised flow fields side by side in one ``[H, W, 2 * slots]`` uint8 array.

    Field i sits in channels ``2 (i - base), 2 (i - base) + 1``, so the stack of frame t (fields
    t .. t+L-1, interleaved dx, dy) is the contiguous channel slice starting at ``2 (t - base)``:
    one strided copy per stack instead of interleaving L fields every time.
    """

    def __init__(self, size: int, length: int, capacity: int = 64) -> None:
        self.length = length
        self.buf = np.empty((size, size, 2 * (capacity + 2 * length)), dtype=np.uint8)
        self.base = 0

    @property
    def slots(self) -> int:
        return self.buf.shape[2] // 2

    def put(self, i: int, field: np.ndarray, *, keep_from: int) -> None:
        """Store field i; fields before ``keep_from`` may be dropped to make room."""
        if i - self.base >= self.slots:
            k = keep_from - self.base
            assert k >= 0 and keep_from <= i < keep_from + self.slots, (i, keep_from, self.base)
            n_keep = self.slots - k
            if n_keep > 0:
                self.buf[:, :, : 2 * n_keep] = self.buf[:, :, 2 * k :].copy()
            self.base = keep_from
        s = i - self.base
        self.buf[:, :, 2 * s : 2 * s + 2] = field

    def repeat_after(self, last: int, *, keep_from: int) -> None:
        """Fill the L slots after field ``last`` with copies of it (the end padding).

        The last frame (T-1) needs fields T-1 .. T+L-2, all of them copies of field T-2.
        """
        field = self.buf[:, :, 2 * (last - self.base) : 2 * (last - self.base) + 2].copy()
        for j in range(1, self.length + 1):
            self.put(last + j, field, keep_from=keep_from)

    def stack_view(self, t: int) -> np.ndarray:
        """``[H, W, 2L]`` uint8: fields t .. t+L-1, interleaved (a view: copy it before the next
        :meth:`put`)."""
        s = t - self.base
        return self.buf[:, :, 2 * s : 2 * (s + self.length)]


class _ChunkBuilder:
    """Fills preallocated chunk arrays frame by frame (one copy per input)."""

    def __init__(
        self,
        size: int,
        *,
        want_app: bool,
        want_motion: bool,
        length: int,
        app_size: int = CROP_SIZE,
    ) -> None:
        self.size = size
        self.app_size = app_size
        self.want_app = want_app
        self.want_motion = want_motion
        self.length = length
        self._new()

    def _new(self) -> None:
        n, c = self.size, CROP_SIZE
        self.indices = np.empty(n, dtype=np.int64)
        a = self.app_size
        self.app = np.empty((n, a, a, 3), dtype=np.uint8) if self.want_app else None
        self.motion = np.empty((n, c, c, 2 * self.length), np.uint8) if self.want_motion else None
        self.count = 0

    def add(self, t: int, app: np.ndarray | None, stack: np.ndarray | None) -> None:
        i = self.count
        self.indices[i] = t
        if self.app is not None:
            assert app is not None
            self.app[i] = app
        if self.motion is not None:
            assert stack is not None
            self.motion[i] = stack
        self.count += 1

    def full(self) -> bool:
        return self.count == self.size

    def take(self) -> FrameChunk:
        n = self.count
        chunk = FrameChunk(
            indices=self.indices[:n],
            appearance=self.app[:n] if self.app is not None else None,
            motion=self.motion[:n] if self.motion is not None else None,
        )
        self._new()
        return chunk


def _flow_field(
    flow: FlowBackend, prev: np.ndarray, nxt: np.ndarray, crop_box: tuple[int, int]
) -> np.ndarray:
    quantized_field = getattr(flow, "quantized_field", None)
    if quantized_field is not None:  # crops and quantises where it computes (e.g. on a GPU)
        return np.asarray(quantized_field(prev, nxt, crop_box, CROP_SIZE))
    top, left = crop_box
    f = flow(prev, nxt)[top : top + CROP_SIZE, left : left + CROP_SIZE]  # [224, 224, 2]
    return quantize_flow(f)
