"""One video -> model-ready uint8 inputs, streamed in chunks of frames.

Decoding, resizing, flow and stacking happen here, frame by frame, holding only what the next
stacks need (the last L flow fields), so a long video never sits in memory. Yields
:class:`FrameChunk` items (the frames' appearance crops and motion stacks, still uint8) and ends
with one :class:`VideoDone` that says how many frames the video had.

Frame selection: every frame by default. ``stride`` keeps frames 0, s, 2s, ...; ``max_frames``
then keeps at most that many of them, evenly spaced (first and last included), which needs the
frame count first (one extra decode pass). The motion stack of a kept frame t is still built from
the flow between consecutive decoded frames t, t+1, ..., t+L; only the fields some kept frame
needs are computed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractor.decode import count_frames, iter_frames, probe
from extractor.flow import FlowBackend
from extractor.transforms import (
    CROP_SIZE,
    STACK_LENGTH,
    center_crop,
    center_crop_box,
    quantize_flow,
    resize_shorter,
    to_gray,
    zero_flow_field,
)


@dataclass
class FrameChunk:
    """Consecutive kept frames of one video, as uint8 model inputs.

    ``appearance``: ``[n, 224, 224, 3]`` RGB crops; ``motion``: ``[n, 224, 224, 20]`` flow stacks
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
) -> Iterator[FrameChunk | VideoDone]:
    """Stream one video's kept frames as uint8 model inputs; the last item is a :class:`VideoDone`.

    Raises :class:`extractor.decode.VideoError` (possibly after some chunks: discard them) when the
    file cannot be decoded in full. ``flow`` is required for the motion stream and is used from
    this thread only. ``should_stop`` is polled between frames to abandon the video early.
    """
    check_selection(stride, max_frames)
    want_app = "appearance" in streams
    want_motion = "motion" in streams
    if want_motion and flow is None:
        raise ValueError("the motion stream needs a flow backend")
    info = probe(path)
    if max_frames is not None:
        kept_set = set(select_frames(count_frames(path), stride, max_frames).tolist())

        def selected(t: int) -> bool:
            return t in kept_set
    else:

        def selected(t: int) -> bool:
            return t % stride == 0

    def field_needed(i: int) -> bool:  # some kept frame's stack covers field i
        return any(selected(t) for t in range(max(0, i - length + 1), i + 1))

    fields: dict[int, np.ndarray] = {}  # field index -> cropped uint8 [224, 224, 2]
    pending: deque[tuple[int, np.ndarray | None]] = deque()  # kept frames awaiting their stack
    ready: list[tuple[int, np.ndarray | None, np.ndarray | None]] = []
    grays: deque[np.ndarray] = deque(maxlen=2)  # the last two grayscale frames
    crop_box: tuple[int, int] | None = None
    kept: list[int] = []
    n = 0

    def stack_for(t0: int, last_field: int) -> np.ndarray:
        return np.concatenate([fields[min(t0 + j, last_field)] for j in range(length)], axis=-1)

    def flush(final: bool = False) -> Iterator[FrameChunk]:
        while len(ready) >= chunk_size or (final and ready):
            part, ready[:] = ready[:chunk_size], ready[chunk_size:]
            yield FrameChunk(
                indices=np.array([p[0] for p in part], dtype=np.int64),
                appearance=np.stack([p[1] for p in part]) if want_app else None,  # type: ignore[misc]
                motion=np.stack([p[2] for p in part]) if want_motion else None,  # type: ignore[misc]
            )

    for t, frame in enumerate(iter_frames(path)):
        if should_stop is not None and should_stop():
            return
        n = t + 1
        resized = resize_shorter(frame)[0].numpy()  # [h, w, 3] uint8
        if crop_box is None:
            crop_box = center_crop_box(resized.shape[0], resized.shape[1])
        keep = selected(t)
        app = np.ascontiguousarray(center_crop(resized)) if want_app and keep else None
        if keep:
            kept.append(t)
        if not want_motion:
            if keep:
                ready.append((t, app, None))
            yield from flush()
            continue
        grays.append(to_gray(resized))
        if t >= 1 and field_needed(t - 1):
            fields[t - 1] = _flow_field(flow, grays[0], grays[1], crop_box)  # type: ignore[arg-type]
        if keep:
            pending.append((t, app))
        # frame t0's stack is complete once field t0 + L - 1 exists, i.e. at frame t0 + L
        while pending and pending[0][0] + length <= t:
            t0, a = pending.popleft()
            ready.append((t0, a, stack_for(t0, t0 + length - 1)))
        oldest = pending[0][0] if pending else t
        for i in [i for i in fields if i < oldest and i < t - 1]:
            del fields[i]
        yield from flush()

    if want_motion and pending:
        last_field = n - 2
        if n == 1:
            assert crop_box is not None
            last_field = 0
            fields[0] = zero_flow_field(CROP_SIZE, CROP_SIZE)
        elif last_field not in fields:
            fields[last_field] = _flow_field(flow, grays[0], grays[1], crop_box)  # type: ignore[arg-type]
        while pending:
            t0, a = pending.popleft()
            ready.append((t0, a, stack_for(t0, last_field)))
    yield from flush(final=True)
    yield VideoDone(
        n_frames=n,
        frame_indices=np.array(kept, dtype=np.int64),
        fps=info.fps,
        width=info.width,
        height=info.height,
        codec=info.codec,
    )


def _flow_field(
    flow: FlowBackend, prev: np.ndarray, nxt: np.ndarray, crop_box: tuple[int, int]
) -> np.ndarray:
    top, left = crop_box
    f = flow(prev, nxt)[top : top + CROP_SIZE, left : left + CROP_SIZE]  # [224, 224, 2]
    return quantize_flow(f)
