"""Fixtures for extractor tests: small generated clips and deliberately broken files."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest


def write_clip(path: Path, frames: np.ndarray, *, fps: int = 25, codec: str = "mpeg4") -> Path:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` into ``path`` with PyAV (high quality)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {"crf": "10"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    """An AAC audio file with no video stream."""
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for _ in range(10):
            samples = (rng.standard_normal((1, 1024)) * 1000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def textured_frames(n: int, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random texture translated by one pixel right per frame, ``[n, H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 4 + 2, (width + 4 * n) // 4 + 2, 3))
    big = np.kron(base, np.ones((4, 4, 1))).astype(np.float32)
    frames = [big[:height, n - t : n - t + width] for t in range(n)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def bad_inputs(
    tmp_path_factory: pytest.TempPathFactory, real_videos: list[Path]
) -> dict[str, Path]:
    """One file per kind of bad input, each with the problem its name says."""
    d = tmp_path_factory.mktemp("bad")
    zero = d / "zero_bytes.mp4"
    zero.write_bytes(b"")
    text = d / "text_file.mp4"
    text.write_text("this is not a video\n" * 50)
    audio = write_audio_only(d / "audio_only.m4a")
    avi = next(p for p in real_videos if p.name == "mm_test.avi")
    data = avi.read_bytes()
    truncated = d / "truncated.avi"
    truncated.write_bytes(data[: int(len(data) * 0.4)])
    mp4 = next(p for p in real_videos if p.name == "mm_part_0.mp4")
    data = mp4.read_bytes()
    truncated_mp4 = d / "truncated.mp4"
    truncated_mp4.write_bytes(data[: int(len(data) * 0.4)])
    return {
        "zero": zero,
        "text": text,
        "audio": audio,
        "truncated_avi": truncated,
        "truncated_mp4": truncated_mp4,
        "missing": d / "does_not_exist.mp4",
    }
