"""Decoding with torchcodec (FFmpeg on the CPU, NVDEC on a CUDA device), and the choice of decoder.

:func:`iter_frames_torchcodec` keeps the contract of :func:`extractor.decode.iter_frames`: every
frame of the file's first video stream in presentation order, ``[H, W, 3]`` uint8 RGB, and a
:class:`~extractor.decode.VideoError` naming the file for the same problems (the file is first
opened and checked by :mod:`extractor.decode`, so both decoders accept and reject the same files).
On a CUDA device the frames are CUDA tensors and never cross to host memory before resizing.

Frames are read one after the other with torchcodec's next-frame decoding, not by index: index
access maps frames through their timestamps, and AVI files with B-frames end with frames that
carry none, which index access never returns (2 of the 103 frames of
``mm_S001C001P001R001A001_rgb.avi`` and 1 of the 164 of ``mm_test.avi`` among the real clips).

On the CPU the frames equal PyAV's bit for bit on every real clip when torchcodec loads the FFmpeg
that PyAV bundles (FFmpeg 8; ``benchmarks/gpu_check.sh`` shows how). With the system's FFmpeg
5.1 they are equal on 11 of the 12 clips (h264 and mpeg4, AVI and MP4, so the YUV to RGB
conversion agrees), and on the mpeg4 clip ``tu_v_Basketball_g01_c01.avi`` 30 of its 32.5 million
values differ, by at most 2: the two FFmpeg versions' mpeg4 decoders differ on that file. On a
CUDA device NVDEC converts YUV to RGB itself, and frames differ from PyAV's by a few levels.

``--decoder auto`` picks torchcodec with NVDEC when the model runs on a CUDA device and torchcodec
loads, else PyAV, and decodes with PyAV a file that torchcodec fails on before its first frame;
``pyav`` and ``torchcodec`` force one (torchcodec then decodes on the model's device).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extractor.decode import (
    VideoError,
    _ffmpeg_reason,
    _open,
    _video_stream,
    check_frame_count,
    iter_frames,
)
from extractor.urls import is_url

log = logging.getLogger(__name__)

DECODERS = ("auto", "pyav", "torchcodec")

#: Reads one video: yields its frames, ``[H, W, 3]`` uint8 RGB (NumPy, or a torch tensor that may
#: live on a CUDA device).
FrameReader = Callable[[Path | str], Iterator[np.ndarray | torch.Tensor]]


class TorchcodecError(VideoError):
    """torchcodec failed on a file that PyAV opened: before its first frame, so nothing was read.

    With ``--decoder auto`` the video is then decoded with PyAV instead (e.g. a GPU whose driver
    lacks NVDEC, or a codec torchcodec's FFmpeg does not know).
    """


@functools.cache
def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode here (not installed, no FFmpeg libraries), or None."""
    try:
        from torchcodec import _core
        from torchcodec.decoders import VideoDecoder  # noqa: F401

        # recent releases load FFmpeg's libraries on first use, not on import: ask for them now
        _core.get_ffmpeg_library_versions()
    except Exception as exc:  # ImportError, or RuntimeError when FFmpeg's libraries are missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"torchcodec cannot be loaded ({type(exc).__name__}: {first}); install it "
            "(pip install torchcodec, a release matching torch) and FFmpeg's shared libraries "
            "4 to 8 (e.g. apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 "
            "libswresample4 libavdevice59 libavfilter8), or put links to PyAV's own copies on "
            "LD_LIBRARY_PATH as benchmarks/gpu_check.sh does"
        )
    if not hasattr(_core, "get_next_frame"):
        return "this torchcodec release lacks sequential decoding (torchcodec._core.get_next_frame)"
    return None


def _next_frame(decoder: Any) -> torch.Tensor | None:
    """The next frame of a torchcodec ``VideoDecoder`` (decode order resolved), None at the end."""
    from torchcodec import _core

    try:
        frame, _pts, _duration = _core.get_next_frame(decoder._decoder)
    except IndexError:  # "no more frames left to decode"
        return None
    return frame


def iter_frames_torchcodec(
    path: str | Path, *, device: str | torch.device = "cpu", threads: int = 1
) -> Iterator[torch.Tensor]:
    """Yield every frame of the first video stream as an ``[H, W, 3]`` uint8 RGB tensor.

    ``device``: ``cpu`` (FFmpeg; ``threads`` FFmpeg threads, 0 lets FFmpeg choose) or a CUDA
    device (NVDEC; torchcodec falls back to the CPU for codecs NVDEC lacks). Raises
    :class:`~extractor.decode.VideoError` like :func:`extractor.decode.iter_frames`, possibly after
    having yielded frames (truncation): the caller must then discard them.
    """
    problem = torchcodec_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from torchcodec.decoders import VideoDecoder

    p = Path(path)
    with _open(p) as container:  # the checks (and accepted containers) of extractor.decode
        stream = _video_stream(container, p)
        index = int(stream.index)
        declared = int(stream.frames or 0)
    dev = torch.device(device)
    try:
        decoder = VideoDecoder(
            str(p),
            stream_index=index,
            dimension_order="NHWC",
            num_ffmpeg_threads=threads,
            device=str(dev),
            seek_mode="approximate",  # sequential reading needs no index scan
        )
    except (RuntimeError, ValueError) as exc:
        raise TorchcodecError(
            f"{str(p)!r}: torchcodec cannot open its video stream on {dev} ({_ffmpeg_reason(exc)})"
        ) from exc
    n = 0
    while True:
        try:
            frame = _next_frame(decoder)
        except RuntimeError as exc:
            if n == 0:
                raise TorchcodecError(
                    f"{str(p)!r}: torchcodec cannot decode the video stream on {dev} "
                    f"({_ffmpeg_reason(exc)})"
                ) from exc
            raise VideoError(
                f"{str(p)!r}: truncated or corrupt: decoding failed after {n} frames "
                f"({_ffmpeg_reason(exc)})"
            ) from exc
        if frame is None:
            break
        if n == 0 and dev.type == "cuda" and decoder.cpu_fallback:
            log.info("%s: %s", p, decoder.cpu_fallback)
        yield frame
        n += 1
    if n == 0:
        raise TorchcodecError(f"{str(p)!r}: torchcodec decoded no frame of the video stream")
    check_frame_count(p, n, declared)


def resolve_decoder(decoder: str, device: str | torch.device) -> tuple[str, torch.device]:
    """``(decoder, decode device)`` for ``--decoder`` and the model's device.

    ``auto``: torchcodec on the model's CUDA device when torchcodec loads, else PyAV on the CPU.
    ``torchcodec``: torchcodec on the model's device (NVDEC on CUDA, FFmpeg on the CPU); an error
    naming the problem when it cannot load. ``pyav``: PyAV on the CPU.
    """
    dev = torch.device(device)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {list(DECODERS)}")
    if decoder == "pyav":
        return "pyav", torch.device("cpu")
    problem = torchcodec_problem()
    if decoder == "torchcodec":
        if problem is not None:
            raise ValueError(f"--decoder torchcodec: {problem}")
        return "torchcodec", dev
    if dev.type == "cuda":
        if problem is None:
            return "torchcodec", dev
        log.warning("--decoder auto: decoding with PyAV on the CPU: %s", problem)
    return "pyav", torch.device("cpu")


def make_frame_reader(decoder: str = "auto", device: str | torch.device = "cpu") -> FrameReader:
    """The function that reads one video's frames for ``--decoder`` on the model's ``device``."""
    name, dev = resolve_decoder(decoder, device)
    if name == "pyav":
        return iter_frames
    fallback = decoder == "auto"

    def read(path: Path | str) -> Iterator[np.ndarray | torch.Tensor]:
        if is_url(path):  # torchcodec would hand the URL to FFmpeg: read it through fsspec
            yield from iter_frames(path)
            return
        try:
            for frame in iter_frames_torchcodec(path, device=dev):
                yield frame.numpy() if frame.device.type == "cpu" else frame
        except TorchcodecError as exc:  # raised before any frame was yielded
            if not fallback:
                raise
            log.warning("%s; decoding it with PyAV", exc)
            yield from iter_frames(path)

    read.__name__ = f"torchcodec_{dev.type}"
    return read
