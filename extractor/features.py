"""``FeatureExtractor``: the backbones, the flow backend and their exact configuration.

One object holds everything that determines a feature: per stream the backbone (arch, weights,
conv1 initialisation), the input transform, the flow backend and its parameters, and the compute
dtype. :meth:`FeatureExtractor.config` is what a store records under its ``extractor`` attribute,
and :meth:`FeatureExtractor.from_config` rebuilds an identical extractor from it (weights reloaded
from the recorded path and checked against the recorded sha256; random weights rebuilt from their
seed and checked against the recorded state hash), so that the service and the fine-tuner compute
features comparable with the store's.

:meth:`FeatureExtractor.extract_file` extracts one video in memory; batch extraction into a store
is :mod:`extractor.pipeline`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.backbones import (
    ARCHS,
    STREAMS,
    WeightsSpec,
    appearance_input,
    fold_batchnorm,
    imagenet_checkpoint,
    is_timm,
    load_backbone,
    resolve_weights,
)
from extractor.flow import FLOW_BACKENDS, FlowBackend, flow_from_config, make_flow, sha256_file
from extractor.prepare import FrameChunk, FrameCountChanged, VideoDone, prepare_video
from extractor.runtime import DTYPE_NAMES, resolve_device, resolve_precision
from extractor.spec import MAP_SOURCES, BackboneSpec
from extractor.transforms import (
    CROP_SIZE,
    DEFAULT_APPEARANCE_INPUT,
    FLOW_BOUND,
    FLOW_MEAN,
    FLOW_STD,
    RESIZE_SHORTER,
    STACK_LENGTH,
    AppearanceInput,
    normalize_appearance,
    normalize_motion,
)

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # the recorded dtype names
MAP_STREAMS = MAP_SOURCES  # map -> its source stream (extractor.spec's table)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The compute dtype a configuration records (``bfloat16`` or ``float32``) for ``dtype``
    (``auto``, ``fp32``/``bf16`` or the recorded names): ``auto`` -> bfloat16 where the device
    has it natively (:func:`extractor.runtime.resolve_precision`)."""
    try:
        return DTYPE_NAMES[resolve_precision(dtype, device)]
    except ValueError:
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}") from None


@dataclass
class ExtractedVideo:
    """Features of one video: ``features[stream]`` is ``[n, d]`` float32, one row per kept frame.

    ``n_frames`` is the number of decoded frames T; ``frame_indices`` (int64 ``[n]``) says which
    frames the rows are (``arange(T)`` unless subsampled).
    """

    features: dict[str, np.ndarray]
    n_frames: int
    frame_indices: np.ndarray
    fps: float
    width: int
    height: int
    codec: str
    frame_times: np.ndarray | None = None  # float64 [n]: presentation time of each row, seconds


def _input_config(stream: str, app_input: AppearanceInput) -> dict[str, Any]:
    if stream == "appearance":
        return app_input.config()
    return {
        "input_size": CROP_SIZE,
        "resize_shorter": RESIZE_SHORTER,
        "flow_input": "grayscale at the resized resolution, before cropping",
        "flow_bound": FLOW_BOUND,
        "flow_quantization": "floor((clip(f, -20, 20) + 20) * 255 / 40 + 0.5)",
        "stack_length": STACK_LENGTH,
        "stack_order": "dx_t, dy_t, dx_t+1, dy_t+1, ...; last field repeated past the end",
        "crop": "center",
        "normalize_mean": FLOW_MEAN,
        "normalize_std": FLOW_STD,
    }


class FeatureExtractor:
    """Per-frame appearance and/or motion features with one fixed, recordable configuration.

    ``spec`` (:class:`extractor.spec.BackboneSpec`, default: its defaults) says which backbones,
    weights, flow backend and compute dtype; ``device`` and ``batch_size`` where and in how large
    batches :meth:`extract_file` runs them.

    ``models[stream]`` are inference copies of the backbones: BatchNorm folded into the
    convolutions, in the compute dtype, channels_last; :func:`extractor.backbones.build_backbone`
    gives the trainable ones.
    """

    def __init__(
        self,
        spec: BackboneSpec | None = None,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 32,
    ) -> None:
        spec = spec if spec is not None else BackboneSpec()
        streams = spec.streams
        if (
            not streams
            or any(s not in STREAMS for s in streams)
            or len(set(streams)) != len(streams)
        ):
            raise ValueError(
                f"streams must be a non-empty subset of {list(STREAMS)}, got {streams!r}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if spec.flow not in FLOW_BACKENDS:
            raise ValueError(
                f"unknown flow backend {spec.flow!r}; choose from {list(FLOW_BACKENDS)}"
            )
        arch = spec.arch
        m_arch = arch if spec.motion_arch is None else spec.motion_arch
        if "motion" in streams and is_timm(m_arch):
            raise ValueError(
                f"the motion stream is a ResNet with a 20-channel conv1, not {m_arch}: choose "
                f"--motion-arch from {', '.join(sorted(ARCHS))}, or extract --streams appearance"
            )
        self.device = resolve_device(device)
        specs: dict[str, WeightsSpec] = {}
        archs: dict[str, str] = {}
        if "appearance" in streams:
            specs["appearance"] = resolve_weights(spec.weights, arch, seed=spec.seed)
            archs["appearance"] = arch
        if "motion" in streams:
            mw = spec.weights if spec.motion_weights is None else spec.motion_weights
            specs["motion"] = resolve_weights(mw, m_arch, seed=spec.seed)
            archs["motion"] = m_arch
        flow_backend = None
        if "motion" in streams:
            flow_backend = make_flow(
                spec.flow,
                weights=spec.flow_weights,
                device=self.device,
                **dict(spec.flow_params or {}),
            )
        elif spec.flow_weights is not None:
            raise ValueError("--flow-weights given but the motion stream is not extracted")
        self._init(
            streams=streams,
            specs=specs,
            arch=archs,
            flow=flow_backend,
            dtype=resolve_dtype(spec.dtype, self.device),
            batch_size=batch_size,
            app_input=appearance_input(arch) if "appearance" in streams else None,
        )

    def _init(
        self,
        *,
        streams: tuple[str, ...],
        specs: Mapping[str, WeightsSpec],
        arch: Mapping[str, str],
        flow: FlowBackend | None,
        dtype: str,
        batch_size: int,
        app_input: AppearanceInput | None = None,
    ) -> None:
        self.streams = streams
        self.appearance_input = app_input or DEFAULT_APPEARANCE_INPUT
        self.flow = flow
        self.dtype = dtype
        self.batch_size = batch_size
        self.models: dict[str, nn.Module] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._specs = dict(specs)
        self._arch = dict(arch)
        for stream in streams:
            model, record = load_backbone(stream, specs[stream], arch[stream])
            model = fold_batchnorm(model).to(
                self.device, dtype=DTYPES[dtype], memory_format=torch.channels_last
            )  # type: ignore[call-overload]
            self.models[stream] = model
            self._records[stream] = record
        self.feature_dims = {s: int(self._records[s]["feature_dim"]) for s in streams}
        self.set_maps(())

    def trainable_backbone(self, stream: str) -> nn.Module:
        """A fresh float32 copy of ``stream``'s backbone with its BatchNorm layers, for training.

        :attr:`models` are inference copies (BatchNorm folded, maybe bfloat16): their state dicts
        do not load as torchvision ResNets, so fine-tuning starts from this one instead.
        """
        if stream not in self._specs:
            raise ValueError(f"stream {stream!r} is not extracted; streams: {list(self.streams)}")
        model, _ = load_backbone(stream, self._specs[stream], self._arch[stream])
        return model.to(self.device)

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, dict[str, Any]]:
        """Per stream, everything that determines its features (JSON-able; the store records it)."""
        out: dict[str, dict[str, Any]] = {}
        for stream in self.streams:
            cfg: dict[str, Any] = {"stream": stream, **self._records[stream]}
            cfg.update(_input_config(stream, self.appearance_input))
            if stream == "motion":
                assert self.flow is not None
                cfg["flow"] = self.flow.config()
            cfg["dtype"] = self.dtype
            cfg["inference"] = "batchnorm folded into the convolutions, channels_last"
            out[stream] = cfg
        out.update(self._map_configs)
        return out

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Mapping[str, Any]],
        *,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        streams: Iterable[str] | None = None,
        weights_paths: Mapping[str, str | Path] | None = None,
        dtype: str | None = None,
    ) -> FeatureExtractor:
        """Rebuild the extractor a store recorded (``store.extractor``), checking it is identical.

        File weights are reloaded from the recorded path (or ``weights_paths[stream]`` when the
        file has moved) and must have the recorded sha256; ImageNet weights are looked up in this
        machine's torchvision cache and must match too; random weights are rebuilt from the seed.
        The rebuilt backbone's state hash must equal the recorded one. ``dtype`` overrides the
        recorded compute dtype (features then differ at bf16 precision).
        """
        wanted = tuple(streams) if streams is not None else tuple(s for s in STREAMS if s in config)
        if not wanted:
            raise ValueError(f"no extractor streams in the recorded config: {sorted(config)}")
        missing = [s for s in wanted if s not in config]
        if missing:
            raise ValueError(f"streams {missing} not in the recorded config {sorted(config)}")
        self = cls.__new__(cls)
        self.device = resolve_device(device)
        specs: dict[str, WeightsSpec] = {}
        arch: dict[str, str] = {}
        for stream in wanted:
            cfg = config[stream]
            arch[stream] = str(cfg["arch"])
            override = (weights_paths or {}).get(stream)
            specs[stream] = _recorded_weights(stream, cfg, override)
        flow = None
        if "motion" in wanted:
            flow = flow_from_config(dict(config["motion"]["flow"]), device=self.device)
        dtypes = {str(config[s]["dtype"]) for s in wanted}
        if len(dtypes) != 1:
            raise ValueError(f"recorded streams differ in dtype: {sorted(dtypes)}")
        use_dtype = resolve_dtype(dtype, self.device) if dtype is not None else dtypes.pop()
        self._init(
            streams=wanted,
            specs=specs,
            arch=arch,
            flow=flow,
            dtype=use_dtype,
            batch_size=batch_size,
            app_input=_recorded_appearance_input(config["appearance"])
            if "appearance" in wanted
            else None,
        )
        for stream in wanted:
            recorded = config[stream].get("state_sha256")
            rebuilt = self._records[stream]["state_sha256"]
            if recorded is not None and recorded != rebuilt:
                raise ValueError(
                    f"the {stream} backbone rebuilt from {_describe(config[stream])} differs from "
                    f"the recorded one (state sha256 {rebuilt} != {recorded}); random weights "
                    "depend on the NumPy version, file weights on the file"
                )
        return self

    # ------------------------------------------------------------------ computing
    def embed(self, batch: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
        """Features of a batch of uint8 model inputs (NHWC, as :class:`FrameChunk` holds them).

        ``batch[stream]`` is ``[N, 224, 224, 3]`` (appearance) or ``[N, 224, 224, 20]`` (motion);
        returns ``[N, d]`` float32 per stream.
        """
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for stream in self.streams:
                x = torch.as_tensor(batch[stream])
                if self.device.type == "cuda":
                    if not x.is_pinned():
                        x = x.pin_memory()
                    x = x.to(self.device, non_blocking=True)
                if stream == "appearance":
                    app = self.appearance_input
                    inp = normalize_appearance(x, app.mean, app.std)
                else:
                    inp = normalize_motion(x)
                inp = inp.to(DTYPES[self.dtype])  # normalised in float32, then rounded once
                out[stream] = self.models[stream](inp).float().cpu().numpy()
        return out

    # ------------------------------------------------------------------ spatial maps
    def set_maps(
        self, maps: Sequence[str], *, dim: int | None = None, stride: int = 1, seed: int = 0
    ) -> None:
        """Also output spatial feature maps (``appearance_map``, ``motion_map``).

        A map is the last convolutional block's output of its source stream's backbone, the
        tensor the pooled feature is the spatial mean of (``[h, w, C]``, 7 x 7 at 224), taken from
        the same forward pass. ``dim`` reduces C by a fixed random projection (Gaussian entries of
        variance ``1/dim`` drawn with NumPy's PCG64 from ``seed``, so that the spatial mean of a
        reduced map is the projected pooled feature); ``stride`` keeps the maps of every
        ``stride``-th extracted frame, starting with the first.
        """
        maps = tuple(maps)
        bad = [m for m in maps if m not in MAP_STREAMS]
        if bad or len(set(maps)) != len(maps):
            raise ValueError(f"maps must be distinct names among {list(MAP_STREAMS)}, got {maps!r}")
        missing = [m for m in maps if MAP_STREAMS[m] not in self.streams]
        if missing:
            raise ValueError(
                f"maps {missing} need their source streams "
                f"{[MAP_STREAMS[m] for m in missing]}, which this extractor does not compute"
            )
        timm = [m for m in maps if is_timm(self._arch[MAP_STREAMS[m]])]
        if timm:
            raise ValueError(
                f"maps {timm} need a ResNet backbone (its last block's output); "
                f"{self._arch[MAP_STREAMS[timm[0]]]!r} is a timm model"
            )
        if dim is not None and dim < 1:
            raise ValueError(f"map dim must be >= 1, got {dim!r}")
        if stride < 1:
            raise ValueError(f"map stride must be >= 1, got {stride!r}")
        self.map_streams: tuple[str, ...] = maps
        self.map_stride = stride
        self._projections: dict[str, torch.Tensor] = {}
        self._map_configs: dict[str, dict[str, Any]] = {}
        for name in maps:
            source = MAP_STREAMS[name]
            channels = self.feature_dims[source]
            projection: dict[str, Any] | None = None
            if dim is not None:
                rng = np.random.Generator(np.random.PCG64(seed))
                matrix = rng.standard_normal((channels, dim), dtype=np.float64)
                matrix = (matrix / np.sqrt(dim)).astype(np.float32)
                self._projections[name] = torch.from_numpy(matrix).to(self.device)
                projection = {
                    "kind": "gaussian, entries N(0, 1/out_channels), NumPy PCG64",
                    "seed": seed,
                    "in_channels": channels,
                    "out_channels": dim,
                    "sha256": hashlib.sha256(matrix.tobytes()).hexdigest(),
                }
            self._map_configs[name] = {
                "stream": name,
                "source_stream": source,
                "source_state_sha256": self._records[source]["state_sha256"],
                "layer": "output of the last convolutional block (layer4), before global "
                "average pooling",
                "layout": "[frames, h, w, channels]",
                "channels": dim if dim is not None else channels,
                "projection": projection,
                "frame_stride": stride,
                "frames": "every frame_stride-th extracted frame from the first; per video "
                "in the attr map_frame_indices",
                "dtype": "float16",
            }

    def embed_with_maps(
        self,
        batch: Mapping[str, np.ndarray | torch.Tensor],
        map_rows: np.ndarray | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """:meth:`embed` plus the spatial maps of the rows ``map_rows`` of the batch (default all).

        Returns ``(features {stream: [N, d] float32}, maps {map: [len(map_rows), h, w, C]
        float16})`` from one forward pass per stream.
        """
        rows = None if map_rows is None else torch.as_tensor(map_rows, dtype=torch.long)
        features: dict[str, np.ndarray] = {}
        maps: dict[str, np.ndarray] = {}
        wanted = {MAP_STREAMS[m]: m for m in self.map_streams}
        with torch.inference_mode():
            for stream in self.streams:
                x = torch.as_tensor(batch[stream])
                if self.device.type == "cuda":
                    x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
                inp = normalize_appearance(x) if stream == "appearance" else normalize_motion(x)
                inp = inp.to(DTYPES[self.dtype])
                model = self.models[stream]
                captured: list[torch.Tensor] = []
                hook = None
                if stream in wanted:
                    pool = model.avgpool
                    assert isinstance(pool, nn.Module)
                    hook = pool.register_forward_hook(
                        lambda _m, i, _o, out=captured: out.append(i[0])
                    )
                try:
                    features[stream] = model(inp).float().cpu().numpy()
                finally:
                    if hook is not None:
                        hook.remove()
                if stream in wanted:
                    name = wanted[stream]
                    fmap = captured[0] if rows is None else captured[0][rows.to(self.device)]
                    fmap = fmap.float().permute(0, 2, 3, 1)  # [n, h, w, C]
                    if name in self._projections:
                        fmap = fmap @ self._projections[name]  # [n, h, w, dim]
                    maps[name] = fmap.to(torch.float16).cpu().numpy()
        return features, maps

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
        embed: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
    ) -> ExtractedVideo:
        """Decode and embed one video (every frame unless ``stride``/``max_frames`` subsample).

        Raises :class:`extractor.decode.VideoError` for a file that cannot be decoded in full, and
        :class:`extractor.decode.VideoTooLarge` for one with more than ``max_decoded_frames``
        frames or a frame of more than ``max_frame_pixels`` pixels (found while decoding).
        Safe to call from several threads (each call uses its own flow backend instance).
        ``should_stop`` is polled once per decoded frame; once it returns true the video is
        abandoned with :class:`InterruptedError` (at most one batch later). ``maps=True`` also
        returns the map streams set by :meth:`set_maps`, ``[n', h, w, C]`` for every
        ``map_stride``-th kept frame from the first (as ``framepool extract`` stores them), from
        the same forward passes as the vectors. ``embed`` replaces :meth:`embed` for the vectors
        (e.g. a batcher that runs several videos' frames in one forward pass; not with maps).

        The video is decoded once; only when its demuxer miscounted its frames and ``max_frames``
        depends on the count is it decoded a second time (logged).
        """
        if maps and not self.map_streams:
            raise ValueError("maps=True needs map streams: call set_maps first")
        if maps and embed is not None:
            raise ValueError("embed= replaces the vectors' forward pass only; not with maps=True")
        vectors = embed if embed is not None else self.embed
        n_frames: int | None = None
        while True:
            batches = _Batches(
                self.batch_size,
                self.streams,
                self._map_embedder() if maps else lambda batch, _start: vectors(batch),
            )
            try:
                done = self._prepare_into(
                    batches,
                    path,
                    stride=stride,
                    max_frames=max_frames,
                    should_stop=should_stop,
                    n_frames=n_frames,
                    max_decoded_frames=max_decoded_frames,
                    max_frame_pixels=max_frame_pixels,
                )
            except FrameCountChanged as exc:
                if n_frames is not None:
                    raise
                log.warning("%s; decoding it again", exc)
                n_frames = exc.decoded
                continue
            break
        features = batches.finish()
        for s in self.streams:
            n = features[s].shape[0]
            assert n == len(done.frame_indices), (s, features[s].shape, len(done.frame_indices))
        return ExtractedVideo(
            features=features,
            n_frames=done.n_frames,
            frame_indices=done.frame_indices,
            fps=done.fps,
            width=done.width,
            height=done.height,
            codec=done.codec,
            frame_times=done.frame_times,
        )

    def _prepare_into(self, batches: _Batches, path: str | Path, **options: Any) -> VideoDone:
        """Feed one video's chunks to ``batches``; its :class:`VideoDone`."""
        for item in prepare_video(
            path,
            streams=self.streams,
            flow=self.flow.clone() if self.flow is not None else None,
            appearance_input=self.appearance_input,
            **options,
        ):
            if isinstance(item, VideoDone):
                return item
            batches.add(item)
        raise InterruptedError(f"{str(path)!r}: extraction stopped before the end")

    def _map_embedder(self) -> _Embed:
        """Embed a batch whose first row is kept frame ``start``: vectors of every row, maps of
        every ``map_stride``-th kept frame."""

        def embed(batch: Mapping[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
            n = len(next(iter(batch.values())))
            rows = np.flatnonzero((start + np.arange(n)) % self.map_stride == 0)
            features, maps = self.embed_with_maps(batch, rows)
            return {**features, **maps}

        return embed


_Embed = Callable[[Mapping[str, np.ndarray], int], Mapping[str, np.ndarray]]


class _Batches:
    """One video's frame chunks gathered into model batches of at least ``size`` frames.

    Each batch is embedded as soon as it is full (so a long video never waits whole in memory)
    by ``embed(batch, start)``, ``start`` being the batch's first kept frame; the outputs are
    concatenated per stream at the end.
    """

    def __init__(self, size: int, streams: Sequence[str], embed: _Embed) -> None:
        self.size = size
        self.streams = streams
        self.embed = embed
        self.pending: list[FrameChunk] = []
        self.n_pending = 0
        self.embedded = 0
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, chunk: FrameChunk) -> None:
        self.pending.append(chunk)
        self.n_pending += len(chunk)
        if self.n_pending >= self.size:
            self._run()

    def finish(self) -> dict[str, np.ndarray]:
        self._run()
        return {s: np.concatenate(p) for s, p in self.parts.items()}

    def _run(self) -> None:
        if not self.pending:
            return
        batch = {s: np.concatenate([getattr(c, s) for c in self.pending]) for s in self.streams}
        for s, f in self.embed(batch, self.embedded).items():
            self.parts.setdefault(s, []).append(f)
        self.embedded += self.n_pending
        self.pending.clear()
        self.n_pending = 0


def _describe(cfg: Mapping[str, Any]) -> str:
    if cfg.get("weights_origin") == "random":
        return f"random weights (seed {cfg.get('seed')})"
    return f"{cfg.get('weights_origin')} weights {cfg.get('weights_path')!r}"


def _recorded_appearance_input(cfg: Mapping[str, Any]) -> AppearanceInput:
    """The appearance input a store recorded (stores without the fields: the default)."""
    default = DEFAULT_APPEARANCE_INPUT
    return AppearanceInput(
        resize_shorter=int(cfg.get("resize_shorter", default.resize_shorter)),
        crop_size=int(cfg.get("input_size", default.crop_size)),
        interpolation=str(cfg.get("resize", default.interpolation)).split(",")[0].strip(),
        mean=tuple(float(v) for v in cfg.get("normalize_mean", default.mean)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("normalize_std", default.std)),  # type: ignore[arg-type]
    )


def _recorded_weights(
    stream: str, cfg: Mapping[str, Any], override: str | Path | None
) -> WeightsSpec:
    origin = cfg.get("weights_origin")
    if origin == "random":
        return WeightsSpec("random", None, None, int(cfg["seed"]))
    if origin == "timm-pretrained":  # timm's own download; the state hash is checked after
        return WeightsSpec("timm-pretrained", None, None, None)
    if origin not in ("imagenet", "file"):
        raise ValueError(f"unknown weights origin {origin!r} in the recorded {stream} config")
    if override is not None:
        path = Path(override).expanduser().resolve()
    elif origin == "imagenet":
        path = imagenet_checkpoint(str(cfg["arch"])).resolve()
    else:
        path = Path(str(cfg["weights_path"]))
    if not path.is_file():
        raise FileNotFoundError(
            f"the {stream} weights recorded in the store, {str(path)!r} (sha256 "
            f"{cfg.get('weights')}), are missing; pass the file's new location"
        )
    digest = sha256_file(path)
    if digest != cfg.get("weights"):
        raise ValueError(
            f"the {stream} weights file {str(path)!r} has changed since extraction: sha256 "
            f"{digest} != recorded {cfg.get('weights')}"
        )
    return WeightsSpec(str(origin), path, digest, None)
