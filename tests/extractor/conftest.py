"""Fixtures for extractor tests: small generated clips and deliberately broken files."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ Ray and S3 (shared per session)
RAY_NODE_CPUS = 2
RAY_OBJECT_STORE = 300 * 2**20


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One Ray cluster for the whole test session: a head node of 2 CPUs and a 300 MB object
    store on this machine (``ray.cluster_utils.Cluster``, so that a test can add a node and
    remove it), this process connected as its driver. Shut down at the end."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": RAY_NODE_CPUS,
            "object_store_memory": RAY_OBJECT_STORE,
            "include_dashboard": False,
        },
    )
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1 and the settings that reach it."""

    endpoint: str
    env: dict[str, str]  # for worker processes (fsspec reads FSSPEC_S3_* when imported)

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key="testing", secret="testing", use_listings_cache=False
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1, with fsspec in this process pointed at it."""
    pytest.importorskip("s3fs")
    import fsspec.config
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    try:
        yield S3Server(endpoint, env)
    finally:
        if old_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old_conf
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
