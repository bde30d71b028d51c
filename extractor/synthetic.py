"""Generated demo clips whose classes differ only in the temporal order of their motion.

A textured square moves over a textured background. A clip is ``rest`` still frames, an excursion
to one side and back, ``rest`` still frames, an excursion to the other side and back, and ``rest``
still frames: class ``left_then_right`` swings left first, ``right_then_left`` right first;
``up_then_down`` and ``down_then_up`` are the vertical pair (they differ from the horizontal pair
in appearance). With the same jitter, a clip of one class is the clip of the other with its two
excursions swapped. With ``rest`` at least the motion stream's stack length (10 flow fields), no
flow stack sees both excursions and the stacks past the end see still frames only, so the two
classes have the same distribution of per-frame appearance *and* of per-frame motion stacks: a
global average (or max) over frames cannot tell them apart; the order, which a temporal pyramid's
second level sees, can. ``rest=0`` gives one sine period instead (the classes are then half a
period apart; flow stacks near the end still differ between them).

Every clip has its own jitter, drawn from ``seed``: the centre, amplitude (and so the speed),
object size, colours and textures, the background, and per-frame sensor noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

DEMO_CLASSES = ("left_then_right", "right_then_left", "up_then_down", "down_then_up")
_MOTION = {  # class -> (axis: 0 = horizontal, 1 = vertical; sign of the first swing)
    "left_then_right": (0, -1.0),
    "right_then_left": (0, 1.0),
    "up_then_down": (1, -1.0),
    "down_then_up": (1, 1.0),
}


def _smooth_texture(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """A blocky-smooth random RGB texture ``[H, W, 3]`` float32 in 0..255."""
    coarse = rng.uniform(0, 255, size=(height // cell + 2, width // cell + 2, 3))
    big = np.kron(coarse, np.ones((cell, cell, 1)))[:height, :width]
    # a 3x3 box blur softens the block edges a little
    pad = np.pad(big, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(pad[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9.0
    return np.asarray(out, dtype=np.float32)


def render_clip(
    label: str,
    rng: np.random.Generator,
    *,
    n_frames: int,
    width: int,
    height: int,
    noise: bool = True,
    rest: int = 0,
) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` uint8 of one clip of class ``label`` with jitter from ``rng``.

    The scene (textures, sizes, path) is drawn from ``rng`` first, the sensor noise last, so two
    classes rendered from equal generators share everything but the order of the motion.
    """
    if label not in _MOTION:
        raise ValueError(f"unknown demo class {label!r}; choose from {list(DEMO_CLASSES)}")
    axis, sign = _MOTION[label]
    background = _smooth_texture(rng, height, width, cell=int(rng.integers(6, 12)))
    background = 0.5 * background + rng.uniform(40, 90)
    side = int(rng.integers(max(6, min(width, height) // 7), max(8, min(width, height) // 5)))
    obj = _smooth_texture(rng, side, side, cell=max(2, side // 4))
    obj = 0.4 * obj + rng.uniform(100, 150, size=3).astype(np.float32)
    along, across = (width, height) if axis == 0 else (height, width)
    # the object stays inside the central crop the extractor keeps (about 87% of a square frame)
    amplitude = rng.uniform(0.18, 0.26) * along
    centre = along / 2 + rng.uniform(-0.04, 0.04) * along
    cross = across / 2 + rng.uniform(-0.2, 0.2) * across
    sigma = rng.uniform(2.0, 5.0)
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for t in range(n_frames):
        offset = sign * amplitude * _path(t, n_frames, rest)
        pos = round(centre + offset - side / 2)
        other = round(cross - side / 2)
        x0, y0 = (pos, other) if axis == 0 else (other, pos)
        img = background.copy()
        xa, ya = max(0, x0), max(0, y0)
        xb, yb = min(width, x0 + side), min(height, y0 + side)
        img[ya:yb, xa:xb] = obj[ya - y0 : yb - y0, xa - x0 : xb - x0]
        if noise:
            img += rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def _path(t: int, n_frames: int, rest: int) -> float:
    """Offset of the object at frame ``t`` in units of the amplitude, for the first-swing sign +1.

    ``rest == 0``: one sine period. Otherwise rest, out-and-back to +1, rest, out-and-back to -1,
    rest (any frames left over from an odd split go to the last rest).
    """
    if rest == 0:
        return math.sin(2 * math.pi * t / n_frames)
    excursion = (n_frames - 3 * rest) // 2
    for k, start in enumerate((rest, 2 * rest + excursion)):
        if start <= t < start + excursion:
            return (1.0 if k == 0 else -1.0) * math.sin(math.pi * (t - start + 0.5) / excursion)
    return 0.0


def write_video(path: Path, frames: np.ndarray, *, fps: int = 25) -> Path:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` (even H and W) to ``path`` with PyAV.

    FFmpeg's own MPEG-4 Part 2 encoder, single-threaded and at high quality: its output is
    byte-identical run after run (libx264's was seen to vary with the machine's load).
    """
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def make_demo_clips(
    out_dir: str | Path,
    n_per_class: int = 12,
    n_frames: int = 32,
    size: tuple[int, int] = (128, 128),
    *,
    classes: Sequence[str] = ("left_then_right", "right_then_left"),
    seed: int = 0,
    fps: int = 25,
    rest: int = 0,
) -> list[tuple[Path, str]]:
    """Write ``n_per_class`` clips per class as ``out_dir/<class>/<class>_<i>.mp4``.

    ``size`` is ``(width, height)`` (even); ``n_frames`` should be even for the classes to share
    per-frame statistics exactly when ``rest`` is 0; with ``rest`` >= 10 (the flow stack length)
    the classes also share per-frame motion-stack statistics (see the module doc), and
    ``n_frames`` must leave room for two excursions of at least 4 frames (``3 rest + 8``).
    Returns ``(path, class)`` pairs, sorted. The same arguments
    always give the same clips; the folder names are the labels ``framepool extract`` infers.
    """
    width, height = size
    if n_per_class < 1 or n_frames < 2:
        raise ValueError(f"need n_per_class >= 1 and n_frames >= 2, got {n_per_class}, {n_frames}")
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least 32x32, got {size!r}")
    if rest < 0 or (rest > 0 and n_frames < 3 * rest + 8):
        raise ValueError(
            f"rest={rest} still frames need n_frames >= {3 * rest + 8} (3 rests and two "
            f"excursions of at least 4 frames), got n_frames={n_frames}"
        )
    unknown = [c for c in classes if c not in _MOTION]
    if unknown or not classes:
        raise ValueError(f"unknown demo classes {unknown}; choose from {list(DEMO_CLASSES)}")
    out = Path(out_dir)
    clips = []
    for label in classes:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, DEMO_CLASSES.index(label), i])
            frames = render_clip(
                label, rng, n_frames=n_frames, width=width, height=height, rest=rest
            )
            path = write_video(folder / f"{label}_{i:03d}.mp4", frames, fps=fps)
            clips.append((path, label))
    log.info("wrote %d demo clips to %s", len(clips), out)
    return sorted(clips)
