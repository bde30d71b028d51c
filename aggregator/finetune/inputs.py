"""Training inputs for fine-tuning: decoded once per run, cached as uint8, loaded chunk by chunk.

Decoding and optical flow are the slow part of a video's inputs, and they do not change between
epochs, so each video is prepared once (:func:`extractor.prepare.prepare_video`, exactly the
inputs ``framepool extract`` feeds its backbones) and cached as uint8:

- appearance: the ``[T, 224, 224, 3]`` centre crops;
- motion: when the kept frames are consecutive (no ``max_frames`` subsampling), only the quantised
  flow fields a stack is made of, ``[T + L - 1, 224, 224, 2]`` (stack t = fields t .. t+L-1, the
  last field already repeated), ten times smaller than the stacks; otherwise the ``[T, 224, 224,
  20]`` stacks themselves.

The cache is a folder (one sub-folder per video, ``.npy`` files read memory-mapped, written
atomically, so an interrupted run reuses what it finished) or, without a folder, memory.

:class:`StoreFeatures` supplies, for the frames outside an epoch's subset, the features a store
already holds, when the store was extracted with the same configuration as the fine-tuned
backbone's starting point.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.finetune.surrogate import Frames
from extractor.flow import FlowBackend
from extractor.prepare import FrameChunk, VideoDone, prepare_video
from extractor.transforms import STACK_LENGTH, motion_stacks, normalize_appearance, normalize_motion
from storage import FeatureStore

log = logging.getLogger(__name__)

# Keys of an extractor config that do not change a feature's value beyond rounding (the compute
# dtype) or do not identify the weights (where the file lies; its sha256 does).
CONFIG_KEYS_IGNORED = ("dtype", "weights_path")


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class AppearanceFrames:
    """uint8 crops ``[T, H, W, 3]`` -> normalised ``[n, 3, H, W]`` chunks on ``device``."""

    def __init__(self, crops: np.ndarray, device: torch.device) -> None:
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"expected crops [T, H, W, 3], got shape {crops.shape}")
        self.crops = crops
        self.device = device

    @property
    def n_frames(self) -> int:
        return int(self.crops.shape[0])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        x = _to_device(self.crops[index.numpy()], self.device)
        return normalize_appearance(x).contiguous(memory_format=torch.channels_last)


class MotionFrames:
    """Motion stacks of ``n_frames`` frames from cached uint8 fields or stacks, normalised.

    ``fields`` ``[T + L - 1, H, W, 2]`` (stack t = fields t..t+L-1) or ``stacks`` ``[T, H, W, 2L]``.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        fields: np.ndarray | None = None,
        stacks: np.ndarray | None = None,
        length: int = STACK_LENGTH,
    ) -> None:
        if (fields is None) == (stacks is None):
            raise ValueError("give exactly one of fields and stacks")
        self.fields, self.stacks, self.length, self.device = fields, stacks, length, device
        if fields is not None and (fields.ndim != 4 or fields.shape[0] < length):
            raise ValueError(f"expected fields [T + {length - 1}, H, W, 2], got {fields.shape}")

    @property
    def n_frames(self) -> int:
        if self.stacks is not None:
            return int(self.stacks.shape[0])
        assert self.fields is not None
        return int(self.fields.shape[0]) - self.length + 1

    def take(self, index: torch.Tensor) -> torch.Tensor:
        idx = index.numpy()
        if self.stacks is not None:
            x = self.stacks[idx]
        else:
            assert self.fields is not None
            x = motion_stacks(self.fields, idx, self.length)  # [n, H, W, 2L]
        return normalize_motion(_to_device(x, self.device)).contiguous(
            memory_format=torch.channels_last
        )


@dataclass
class PreparedVideo:
    """One video's cached uint8 inputs (``motion_fields`` xor ``motion_stacks`` for motion)."""

    frame_indices: np.ndarray  # int64 [T], decoded frame numbers kept
    n_decoded: int
    appearance: np.ndarray | None = None
    motion_fields: np.ndarray | None = None
    motion_stacks: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return len(self.frame_indices)

    def frames(self, device: torch.device) -> dict[str, Frames]:
        out: dict[str, Frames] = {}
        if self.appearance is not None:
            out["appearance"] = AppearanceFrames(self.appearance, device)
        if self.motion_fields is not None:
            out["motion"] = MotionFrames(device=device, fields=self.motion_fields)
        elif self.motion_stacks is not None:
            out["motion"] = MotionFrames(device=device, stacks=self.motion_stacks)
        return out


def prepare_inputs(
    path: str | Path,
    *,
    streams: Sequence[str],
    flow: FlowBackend | None = None,
    max_frames: int | None = None,
    length: int = STACK_LENGTH,
) -> PreparedVideo:
    """Decode one video into its uint8 fine-tuning inputs (see the module docstring)."""
    crops: list[np.ndarray] = []
    stacks: list[np.ndarray] = []
    fields: list[np.ndarray] = []
    last_stack: np.ndarray | None = None
    done: VideoDone | None = None
    for item in prepare_video(
        path, streams=streams, flow=flow, max_frames=max_frames, chunk_size=16, length=length
    ):
        if isinstance(item, VideoDone):
            done = item
            break
        assert isinstance(item, FrameChunk)
        if item.appearance is not None:
            crops.append(item.appearance)
        if item.motion is not None:
            if max_frames is None:
                fields.append(np.ascontiguousarray(item.motion[..., :2]))  # field t of stack t
                last_stack = item.motion[-1]
            else:
                stacks.append(item.motion)
    if done is None:
        raise RuntimeError(f"{str(path)!r}: the frame source ended without a summary")
    consecutive = bool(np.array_equal(done.frame_indices, np.arange(len(done.frame_indices))))
    video = PreparedVideo(frame_indices=done.frame_indices, n_decoded=done.n_frames)
    if crops:
        video.appearance = np.concatenate(crops)
    if "motion" in streams:
        if max_frames is None:
            if not consecutive or last_stack is None:
                raise RuntimeError(f"{str(path)!r}: expected every frame to be kept")
            # the last stack's fields 1..L-1 (already repeated past the end) complete the list
            tail = last_stack.reshape(*last_stack.shape[:2], length, 2).transpose(2, 0, 1, 3)[1:]
            video.motion_fields = np.concatenate([*fields, tail])
        else:
            video.motion_stacks = np.concatenate(stacks)
    return video


_ARRAYS = ("appearance", "motion_fields", "motion_stacks")


class InputCache:
    """Prepared videos by id: on disk under ``folder`` (memory-mapped), or in memory."""

    def __init__(
        self,
        folder: str | Path | None,
        *,
        streams: Sequence[str],
        flow: FlowBackend | None,
        max_frames: int | None,
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.streams = tuple(streams)
        self.flow = flow
        self.max_frames = max_frames
        self._memory: dict[str, PreparedVideo] = {}
        self._key = {
            "streams": list(self.streams),
            "flow": flow.config() if flow is not None else None,
            "max_frames": max_frames,
        }
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _dir(self, video_id: str) -> Path:
        assert self.folder is not None
        return self.folder / video_id

    def _read(self, video_id: str) -> PreparedVideo | None:
        d = self._dir(video_id)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != self._key:
            log.info("input cache %s was made with other settings; preparing again", d)
            shutil.rmtree(d, ignore_errors=True)
            return None
        video = PreparedVideo(
            frame_indices=np.asarray(meta["frame_indices"], dtype=np.int64),
            n_decoded=int(meta["n_decoded"]),
        )
        for name in meta["arrays"]:
            setattr(video, name, np.load(d / f"{name}.npy", mmap_mode="r"))
        return video

    def _write(self, video_id: str, video: PreparedVideo) -> None:
        d = self._dir(video_id)
        tmp = d.with_name(f".{d.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        names = [n for n in _ARRAYS if getattr(video, n) is not None]
        for n in names:
            np.save(tmp / f"{n}.npy", getattr(video, n))
        meta = {
            "key": self._key,
            "frame_indices": video.frame_indices.tolist(),
            "n_decoded": video.n_decoded,
            "arrays": names,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(d, ignore_errors=True)  # a stale entry with other settings
        try:
            os.replace(tmp, d)
        except OSError:  # another process finished the same video first
            shutil.rmtree(tmp, ignore_errors=True)

    def get(self, video_id: str, path: str | Path) -> PreparedVideo:
        """The prepared inputs of ``video_id`` (decoded from ``path`` the first time)."""
        if self.folder is None:
            if video_id not in self._memory:
                self._memory[video_id] = self._prepare(path)
            return self._memory[video_id]
        video = self._read(video_id)
        if video is None:
            self._write(video_id, self._prepare(path))
            video = self._read(video_id)
            assert video is not None
        return video

    def _prepare(self, path: str | Path) -> PreparedVideo:
        flow = self.flow.clone() if self.flow is not None else None
        return prepare_inputs(path, streams=self.streams, flow=flow, max_frames=self.max_frames)


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """An extractor stream config without the keys in :data:`CONFIG_KEYS_IGNORED`."""
    return {k: v for k, v in config.items() if k not in CONFIG_KEYS_IGNORED}


class StoreFeatures:
    """Stored features for the frames outside the subset, for the streams whose recorded extractor
    configuration equals the starting backbone's (see :func:`comparable`).

    Stored features stay those of the starting backbone while fine-tuning moves it: reading them
    saves the no-gradient forward pass of ``(K - 1) / K`` of the frames, at the price of stale
    values for those frames (exact at the first epoch only).
    """

    def __init__(
        self,
        store: FeatureStore,
        extractor_config: Mapping[str, Mapping[str, Any]],
        *,
        device: torch.device,
    ) -> None:
        self.store = store
        self.device = device
        recorded = store.extractor
        self.streams: list[str] = []
        self.mismatch: dict[str, str] = {}
        for stream, cfg in extractor_config.items():
            if stream not in recorded:
                self.mismatch[stream] = "not in the store"
            elif comparable(recorded[stream]) != comparable(cfg):
                a, b = comparable(recorded[stream]), comparable(cfg)
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                self.mismatch[stream] = f"extracted with other settings (differ: {keys})"
            else:
                self.streams.append(stream)
        self._complete = set(store.videos()) if self.streams else set()

    def features(self, video_id: str, video: PreparedVideo) -> dict[str, torch.Tensor] | None:
        """``{stream: [T, d]}`` rows of the kept frames, or None when the store lacks them."""
        if not self.streams or video_id not in self._complete:
            return None
        attrs = self.store.video_attrs(video_id)
        if int(attrs.get("n_frames", -1)) != video.n_decoded:
            return None
        out: dict[str, torch.Tensor] = {}
        for stream in self.streams:
            feats = self.store.read(video_id, stream, dtype=np.float32)
            if feats.shape[0] == video.n_decoded:
                rows = feats[video.frame_indices]
            else:
                stored = attrs.get("frame_indices")
                if stored is None or list(stored) != video.frame_indices.tolist():
                    return None
                rows = feats
            out[stream] = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)
        return out


class FeatureMemory:
    """Each video's latest frame features, kept to stand in for the frames outside later subsets.

    After a video's step its ``[T, d]`` features are remembered (float16): the rows of the
    epoch's subset fresh, the others as they were used. At a later epoch the frames outside the
    subset read their features here instead of running the backbone, so an epoch costs about
    ``|P_r|`` gradient frames (as with a store) while no feature is older than ``K - 1`` epochs
    (a store's are as old as the run). The first visit of a video computes every frame.

    Entries live in ``folder`` (one ``.npy`` per video and stream, replaced atomically; shared by
    the ranks of a run on one filesystem, which write disjoint videos within an epoch) or in
    memory. Cost: ``T * d * 2`` bytes per video and stream.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[tuple[str, str], np.ndarray] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, video_id: str, stream: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{video_id}.{stream}.npy"

    def get(self, video_id: str, stream: str, n_frames: int) -> np.ndarray | None:
        """The remembered ``[T, d]`` float16 features, or None (absent, or another T)."""
        if self.folder is None:
            feats = self._memory.get((video_id, stream))
        else:
            path = self._path(video_id, stream)
            feats = np.load(path) if path.is_file() else None
        if feats is None or feats.shape[0] != n_frames:
            return None
        return feats

    def put(self, video_id: str, stream: str, feats: torch.Tensor | np.ndarray) -> None:
        arr = feats.detach().float().cpu().numpy() if isinstance(feats, torch.Tensor) else feats
        arr = np.asarray(arr, dtype=np.float16)
        if self.folder is None:
            self._memory[(video_id, stream)] = arr
            return
        path = self._path(video_id, stream)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)


class DecodedSource:
    """The :class:`aggregator.finetune.sources.VideoSource` of decoded videos, with features for
    the frames outside the subset from a :class:`StoreFeatures` and/or a :class:`FeatureMemory`."""

    def __init__(
        self,
        paths: Mapping[str, str | Path],
        cache: InputCache,
        *,
        device: torch.device,
        store: StoreFeatures | None = None,
        memory: FeatureMemory | None = None,
    ) -> None:
        self.paths = dict(paths)
        self.cache = cache
        self.device = device
        self.store = store
        self.memory = memory
        if memory is not None:
            self.remember = self._remember

    def prepared(self, video_id: str) -> PreparedVideo:
        return self.cache.get(video_id, self.paths[video_id])

    def frames(self, video_id: str) -> dict[str, Frames]:
        return self.prepared(video_id).frames(self.device)

    def known(self, video_id: str) -> dict[str, torch.Tensor] | None:
        """Features for the frames outside the subset: remembered ones first (fresher), then
        stored ones, per stream; None when neither has any."""
        video = self.prepared(video_id)
        out: dict[str, torch.Tensor] = {}
        if self.store is not None:
            out.update(self.store.features(video_id, video) or {})
        if self.memory is not None:
            for stream in self.cache.streams:
                feats = self.memory.get(video_id, stream, video.n_frames)
                if feats is not None:
                    out[stream] = torch.from_numpy(feats).to(self.device, torch.float32)
        return out or None

    def _remember(self, video_id: str, features: Mapping[str, torch.Tensor]) -> None:
        assert self.memory is not None
        for stream, feats in features.items():
            self.memory.put(video_id, stream, feats)
