"""Window backbones: video transformers (VideoMAE, V-JEPA 2) that see a clip of frames at once.

``--arch hf:<model>`` loads a video model through transformers' ``AutoModel`` (a hub name such as
``MCG-NJU/videomae-base`` or ``facebook/vjepa2-vitl-fpc64-256``, or a local folder holding its
``config.json``). The model reads ``F`` frames at a time (its ``num_frames`` / ``frames_per_clip``)
and gives one feature per *window*: the mean of its last hidden states over all tokens
(``hidden_size`` wide). A video's kept frames (every frame, or ``--fps`` sampled) are cut into
windows of ``F`` consecutive kept frames whose starts are ``--window-stride S`` frames apart
(:func:`window_bounds`): starts 0, S, 2S, ... while a whole window fits, then one window ending at
the last frame when the last stride leaves frames uncovered; a video shorter than one window is
one window, padded by repeating its last frame. Each stored row is stamped with its window's span
(the first and last frame's presentation times) and centre (the span's midpoint).

Frames are resized (shorter side, bilinear, antialiased), centre-cropped to the model's input size
and normalised with the ImageNet mean and std, as both models' processors do (V-JEPA 2 resizes the
shorter side to ``256/224`` of its crop first). Weights: ``imagenet`` (the model's pretrained
weights; the name is the one every backbone option uses) are downloaded into the Hugging Face
cache like torchvision's into the torch hub cache, and offline a missing file is an error naming
it; ``random`` is the model's own initialisation under ``torch.manual_seed(seed)`` from its
config; a path is a state dict or ``.safetensors`` file. The state hash of the loaded model is
recorded either way. Windows from several videos share a model batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.backbones import load_state_file, state_sha256
from extractor.decode import VideoError
from extractor.features import ExtractedVideo, resolve_device
from extractor.flow import sha256_file
from extractor.prepare import FrameChunk, VideoDone, prepare_video
from extractor.transforms import IMAGENET_MEAN, IMAGENET_STD, AppearanceInput

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
ROWS = "windows"  # what a window stream's rows are, as the store's extractor config records it


def is_window_arch(arch: str) -> bool:
    """Whether ``arch`` names a transformers video model (``hf:<model>``)."""
    return str(arch).startswith(HF_PREFIX)


def window_bounds(n_frames: int, size: int, stride: int) -> np.ndarray:
    """``[W, 2]`` kept-frame ranges ``[s, e)`` of the windows of a video of ``n_frames`` kept
    frames: starts ``0, stride, ...`` while a window of ``size`` fits, plus one ending at the last
    frame when frames are left over; ``[[0, n]]`` when the video is shorter than a window."""
    if n_frames < 1 or size < 1 or stride < 1:
        raise ValueError(f"need n_frames, size, stride >= 1, got {n_frames}, {size}, {stride}")
    if n_frames <= size:
        return np.array([[0, n_frames]], dtype=np.int64)
    starts = list(range(0, n_frames - size + 1, stride))
    if starts[-1] + size < n_frames:
        starts.append(n_frames - size)
    return np.array([[s, s + size] for s in starts], dtype=np.int64)


def window_times(times: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``[W]`` and spans ``[W, 2]`` (first and last frame time) of windows ``bounds``
    over frames with presentation times ``times``."""
    spans = np.stack([times[bounds[:, 0]], times[bounds[:, 1] - 1]], axis=1).astype(np.float64)
    return spans.mean(axis=1), spans


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency here
        raise ValueError("--arch hf:<model> needs the transformers package") from exc
    return transformers


def _frames_per_window(config: Any) -> int:
    for key in ("num_frames", "frames_per_clip"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ValueError(f"{config.model_type!r} models declare no frames per clip: not a video model")


def _input_size(config: Any) -> int:
    for key in ("image_size", "crop_size"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{config.model_type!r} models declare no input size")


def _missing_weights(name: str, exc: Exception) -> FileNotFoundError:
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
    return FileNotFoundError(
        f"the pretrained weights of {name!r} (model.safetensors / pytorch_model.bin) are not in "
        f"the Hugging Face cache at {folder} and could not be downloaded ({exc}); on a machine "
        f"with network run `hf download {name}` and copy {folder} here, or give --weights PATH "
        "(a state dict or .safetensors file)"
    )


def load_window_model(
    arch: str, weights: str | Path, *, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``hf:<name>`` in eval mode, and what the store records about it."""
    if not is_window_arch(arch):
        raise ValueError(f"not a window backbone: {arch!r} (expected hf:<model>)")
    name = arch[len(HF_PREFIX) :]
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise _missing_weights(name, exc) from None
    record: dict[str, Any] = {"model_type": config.model_type}
    if str(weights) == "random":
        torch.manual_seed(seed)
        model = tf.AutoModel.from_config(config)
        record.update(weights="random", seed=seed)
    elif str(weights) == "imagenet":
        try:
            model = tf.AutoModel.from_pretrained(name)
        except OSError as exc:
            raise _missing_weights(name, exc) from None
        record.update(weights="pretrained")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--weights {str(path)!r}: no such file")
        model = tf.AutoModel.from_config(config)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_state_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"--weights {str(path)!r} lacks {len(missing)} keys, e.g. {missing[0]}"
            )
        if unexpected:
            log.warning("%s: %d keys not used, e.g. %s", path, len(unexpected), unexpected[0])
        record.update(weights=str(path), weights_sha256=sha256_file(path))
    model.eval()
    record["state_sha256"] = state_sha256(model)
    return model, record


@dataclass
class _Pending:
    """One video's windows in the making."""

    key: int
    clips: list[np.ndarray]
    done: VideoDone
    bounds: np.ndarray
    rows: list[np.ndarray] = field(default_factory=list)


class WindowExtractor:
    """A window backbone over the ``appearance`` stream: uint8 crops in, one row per window.

    ``batch_size`` counts windows (of ``frames`` frames each); windows of several videos share a
    batch. :meth:`extract_file` and :meth:`config` / :meth:`from_config` are those of
    :class:`extractor.features.FeatureExtractor`, so the service serves these runs unchanged.
    """

    streams: tuple[str, ...] = ("appearance",)
    map_streams: tuple[str, ...] = ()

    def __init__(
        self,
        arch: str,
        weights: str | Path = "imagenet",
        *,
        window_stride: int | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        self.arch = arch
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model, self.record = load_window_model(arch, weights, seed=seed)
        self.model.to(self.device)
        cfg: Any = self.model.config
        self.frames = _frames_per_window(cfg)
        self.window_stride = window_stride or self.frames
        if self.window_stride < 1:
            raise ValueError(f"window stride must be >= 1, got {self.window_stride}")
        size = _input_size(cfg)
        shorter = round(size * 256 / 224) if cfg.model_type == "vjepa2" else size
        self.appearance_input = AppearanceInput(shorter, size, "bilinear")
        self.feature_dim = int(cfg.hidden_size)
        self.video_input = "pixel_values_videos" if cfg.model_type == "vjepa2" else "pixel_values"
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.mean = mean.view(1, 1, 3, 1, 1).to(self.device)
        self.std = std.view(1, 1, 3, 1, 1).to(self.device)

    def config(self) -> dict[str, dict[str, Any]]:
        ai = self.appearance_input
        return {
            "appearance": {
                "stream": "appearance",
                "arch": self.arch,
                "backbone": self.arch,
                **self.record,
                "rows": ROWS,
                "window_frames": self.frames,
                "window_stride": self.window_stride,
                "feature_dim": self.feature_dim,
                "input": {"resize_shorter": ai.resize_shorter, "crop_size": ai.crop_size},
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "pooling": "mean of the last hidden states over all tokens",
                "dtype": "float32",
            }
        }

    @classmethod
    def from_config(
        cls, config: Mapping[str, Mapping[str, Any]], *, device: str | torch.device = "auto"
    ) -> WindowExtractor:
        """Rebuild the extractor a store recorded; its state hash must match."""
        cfg = config["appearance"]
        weights = cfg["weights"]
        self = cls(
            str(cfg["arch"]),
            "imagenet" if weights == "pretrained" else weights,
            window_stride=int(cfg["window_stride"]),
            device=device,
            seed=int(cfg.get("seed", 0)),
        )
        if self.record["state_sha256"] != cfg.get("state_sha256"):
            raise ValueError(
                f"the window backbone rebuilt from {cfg['arch']} ({weights}) differs from the "
                f"recorded one (state sha256 {self.record['state_sha256']} != "
                f"{cfg.get('state_sha256')})"
            )
        return self

    @torch.no_grad()
    def embed_clips(self, clips: np.ndarray) -> np.ndarray:
        """``[B, d]`` float32 features of uint8 clips ``[B, F, S, S, 3]``."""
        x = torch.from_numpy(clips).to(self.device).permute(0, 1, 4, 2, 3).float()  # [B,F,3,S,S]
        x = (x / 255.0 - self.mean) / self.std
        kwargs: dict[str, Any] = {self.video_input: x}
        if self.video_input == "pixel_values_videos":
            kwargs["skip_predictor"] = True
        out = self.model(**kwargs).last_hidden_state  # [B, tokens, d]
        return out.mean(dim=1).float().cpu().numpy()

    def clips_of(self, crops: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
        """The uint8 clips ``[F, S, S, 3]`` of windows ``bounds`` (a short one padded with its
        last frame)."""
        out = []
        for s, e in bounds:
            idx = np.minimum(np.arange(s, s + self.frames), e - 1)
            out.append(crops[idx])
        return out

    def prepare(
        self,
        path: str | Path,
        *,
        sample_fps: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        max_decoded_frames: int | None = None,
        max_frame_pixels: int | None = None,
    ) -> tuple[np.ndarray, VideoDone]:
        """Every kept frame's uint8 crop ``[n, S, S, 3]`` and the video's end record
        (``max_decoded_frames``, ``max_frame_pixels``: :func:`extractor.prepare.prepare_video`)."""
        chunks: list[np.ndarray] = []
        done: VideoDone | None = None
        for item in prepare_video(
            path,
            streams=("appearance",),
            appearance_input=self.appearance_input,
            sample_fps=sample_fps,
            should_stop=should_stop,
            chunk_size=32,
            max_decoded_frames=max_decoded_frames,
            max_frame_pixels=max_frame_pixels,
        ):
            if isinstance(item, VideoDone):
                done = item
            elif isinstance(item, FrameChunk):
                assert item.appearance is not None
                chunks.append(item.appearance.copy())
        if done is None:
            raise InterruptedError(f"{str(path)!r}: extraction stopped before the end")
        return np.concatenate(chunks), done

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
    ) -> ExtractedVideo:
        """One video's window features (``stride`` and ``max_frames`` do not apply: windows
        cover every frame); ``frame_times`` are the windows' centres. ``max_decoded_frames`` and
        ``max_frame_pixels`` bound untrusted input (:class:`extractor.decode.VideoTooLarge`)."""
        if maps:
            raise ValueError("window backbones compute no spatial maps")
        crops, done = self.prepare(
            path,
            should_stop=should_stop,
            max_decoded_frames=max_decoded_frames,
            max_frame_pixels=max_frame_pixels,
        )
        bounds = window_bounds(len(crops), self.frames, self.window_stride)
        clips = self.clips_of(crops, bounds)
        rows = [
            self.embed_clips(np.stack(clips[i : i + self.batch_size]))
            for i in range(0, len(clips), self.batch_size)
        ]
        assert done.frame_times is not None
        centres, _ = window_times(done.frame_times, bounds)
        return ExtractedVideo(
            features={"appearance": np.concatenate(rows)},
            n_frames=done.n_frames,
            frame_indices=done.frame_indices[bounds[:, 0]],
            fps=done.fps,
            width=done.width,
            height=done.height,
            codec=done.codec,
            frame_times=centres,
        )


def window_meta(done: VideoDone, bounds: np.ndarray) -> dict[str, Any]:
    """The window rows' times, spans and first frames, as the store records them."""
    assert done.frame_times is not None
    centres, spans = window_times(done.frame_times, bounds)
    return {
        "times": {"appearance": centres.tolist()},
        "time_spans": {"appearance": spans.tolist()},
        "window_frames": [[int(s), int(e)] for s, e in done.frame_indices[bounds - [0, 1]]],
    }


def run_window_extraction(
    sources: Sequence[Any],
    store: str | Path,
    extractor: WindowExtractor,
    *,
    shard: tuple[int, int] | None = None,
    sample_fps: float | None = None,
    progress: bool = True,
) -> Any:
    """``framepool extract`` with a window backbone: videos decoded one after the other, their
    windows embedded in batches across videos, each video written once all its windows are
    back. Returns an :class:`extractor.records.ExtractionSummary`."""
    from tqdm import tqdm

    from extractor.records import ExtractionSummary, todo_sources, video_meta
    from storage import FeatureStore

    start = time.perf_counter()
    class_names = sorted({s.label for s in sources if s.label is not None})
    fstore = FeatureStore.create(store, extractor=extractor.config(), class_names=class_names)
    summary = ExtractionSummary(store=str(store))
    todo = todo_sources(fstore, sources, extractor.streams, shard, summary)
    pending: list[_Pending] = []
    queue: list[tuple[_Pending, np.ndarray]] = []

    def write(v: _Pending) -> None:
        src = todo[v.key]
        meta = video_meta(src, v.done, sha256_file(src.path), sample_fps is not None)
        meta.update(window_meta(v.done, v.bounds))
        feats = {"appearance": np.concatenate(v.rows)}
        try:
            fstore.write_video(
                src.video_id, feats, label=src.label, split=src.split, group=src.group, meta=meta
            )
        except Exception as exc:  # recorded per video; the run goes on
            log.exception("writing %s failed", src.video_id)
            fail(src, f"{str(src.path)!r}: could not write its features: {exc}")
            return
        summary.complete.append(src.video_id)
        summary.frames += v.done.n_frames

    def fail(src: Any, reason: str) -> None:
        summary.failed[src.video_id] = reason
        fstore.mark_failed(src.video_id, reason, label=src.label, split=src.split, group=src.group)

    def run(n: int) -> None:
        taken, queue[:] = queue[:n], queue[n:]
        feats = extractor.embed_clips(np.stack([c for _, c in taken]))
        for (v, _), row in zip(taken, feats, strict=True):
            v.rows.append(row[None])
        for v in list(pending):
            if sum(len(r) for r in v.rows) == len(v.bounds):
                pending.remove(v)
                write(v)

    bar = tqdm(total=len(todo), unit="video", desc="extract", disable=not progress)
    for key, src in enumerate(todo):
        try:
            crops, done = extractor.prepare(src.path, sample_fps=sample_fps)
        except VideoError as exc:
            fail(src, str(exc))
            bar.update(1)
            continue
        bounds = window_bounds(len(crops), extractor.frames, extractor.window_stride)
        video = _Pending(key, [], done, bounds)
        pending.append(video)
        queue.extend((video, clip) for clip in extractor.clips_of(crops, bounds))
        while len(queue) >= extractor.batch_size:
            run(extractor.batch_size)
        bar.update(1)
    if queue:
        run(len(queue))
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.complete.sort()
    summary.skipped.sort()
    return summary


def window_spec_check(spec: Any) -> None:
    """Window backbones cover the appearance stream alone."""
    if tuple(spec.streams) != ("appearance",):
        raise ValueError(
            f"--arch {spec.arch} computes the appearance stream only; got streams {spec.streams}"
        )


__all__ = [
    "HF_PREFIX",
    "WindowExtractor",
    "is_window_arch",
    "load_window_model",
    "run_window_extraction",
    "window_bounds",
    "window_times",
]
