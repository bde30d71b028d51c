"""A light stand-in for a trained run: real decoding, a tiny colour-mean "backbone" and head.

It lets the HTTP behaviour (uploads, limits, errors, the queue) be tested in a second without
torch, next to the end-to-end tests on a real store and run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.similarity import SimilarityIndex
from api.service.served_runs import LoadedRun, Registry, WorkerContext
from api.service.threads import ThreadPlan
from extractor.decode import VideoTooLarge, count_packets, iter_frames, probe

CLASSES = ["blue", "green", "red"]
CONFIG = {"appearance": {"backbone": "colour-mean", "weights": "none"}}


@dataclass
class FakeVideo:
    features: dict[str, np.ndarray]
    n_frames: int
    frame_indices: np.ndarray
    fps: float
    width: int
    height: int


class FakeExtractor:
    """Decodes every frame for real; the feature of a frame is its mean R, G, B in [0, 1]."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.started = threading.Event()
        self.stopped = threading.Event()

    def extract_file(
        self,
        path: str | Path,
        *,
        stride: int = 1,
        max_frames: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        maps: bool = False,
        max_decoded_frames: int | None = None,
        max_frame_pixels: int | None = None,
    ) -> FakeVideo:
        if maps:
            raise ValueError("the fake extractor computes no spatial maps")
        if max_decoded_frames is not None:  # as extractor.prepare does: the demuxer's count
            counted = count_packets(path)
            if counted > max_decoded_frames:
                raise VideoTooLarge(
                    f"{path}: {counted} frames, more than the limit of {max_decoded_frames} frames"
                )
        self.started.set()
        if self.gate is not None:
            for _ in range(3000):  # a job held at its first frame (30 s at most)
                if self.gate.wait(0.01):
                    break
                if should_stop is not None and should_stop():
                    self.stopped.set()
                    raise InterruptedError(f"{path}: stopped")
        info = probe(path)
        decoded = []
        for frame in iter_frames(path):
            if should_stop is not None and should_stop():
                self.stopped.set()
                raise InterruptedError(f"{path}: stopped")
            pixels = frame.shape[0] * frame.shape[1]
            if max_frame_pixels is not None and pixels > max_frame_pixels:
                raise VideoTooLarge(
                    f"{path}: frame {len(decoded)} is {frame.shape[1]}x{frame.shape[0]} = "
                    f"{pixels} pixels, more than the limit of {max_frame_pixels}"
                )
            decoded.append(frame)
        frames = decoded[::stride]
        idx = np.arange(len(frames)) * stride
        if max_frames is not None and len(frames) > max_frames:
            keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
            frames = [frames[i] for i in keep]
            idx = idx[keep]
        feats = np.stack([f.reshape(-1, 3).mean(0) / 255.0 for f in frames]).astype(np.float32)
        return FakeVideo(
            features={"appearance": feats},
            n_frames=len(decoded),
            frame_indices=idx,
            fps=info.fps,
            width=info.width,
            height=info.height,
        )


class FakePredictor:
    def __init__(self) -> None:
        self.run_id = "fake-run"
        self.head = "gap"
        self.class_names = list(CLASSES)
        self.streams = ["appearance"]
        self.extractor: dict[str, Any] = dict(CONFIG)

    def embed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(features["appearance"].mean(0), dtype=np.float32)

    def predict_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        logits = 10.0 * self.embed(features)[::-1]  # B, G, R order of CLASSES
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def beta(self) -> None:
        return None


def fake_registry() -> Registry:
    rng = np.random.default_rng(0)
    index = SimilarityIndex.from_embeddings(
        rng.random((6, 3)).astype(np.float32),
        [f"train{i}" for i in range(6)],
        [CLASSES[i % 3] for i in range(6)],
        {"split": "train"},
    )
    run = LoadedRun(
        run_id="fake-run",
        run_dir=Path("/nonexistent"),
        predictor=FakePredictor(),
        index=index,
        metrics={"top1": 0.5},
        extractor_config=CONFIG,
    )
    return Registry(runs={run.run_id: run}, default_id=run.run_id)


def fake_loader(extractor: FakeExtractor):  # type: ignore[no-untyped-def]
    """A replacement for ``api.service.app._load`` serving the fake run."""

    def load(settings: Any, service_metrics: Any) -> tuple[Registry, list[WorkerContext], Any]:
        registry = fake_registry()
        key = next(iter(registry.runs.values())).extractor_key
        contexts = [
            WorkerContext(extractors={key: extractor})  # type: ignore[dict-item]
            for _ in range(settings.workers)
        ]
        return registry, contexts, ThreadPlan(worker=1, batcher=0, opencv=1)

    return load
