"""A whole fine-tuning job on video files: backbones, head, cached inputs, store reuse, outputs.

:func:`run_finetune_job` is what ``framepool finetune`` runs in every process; the benchmark calls
it too. The starting backbones come from :class:`extractor.features.FeatureExtractor` (the same
weights resolution, cross-modality initialisation and recorded configuration as ``framepool
extract``), so the output directory's ``backbone_<stream>.pt`` load with ``framepool extract
--weights`` / ``--motion-weights`` and a store re-extracted with them can be evaluated with the
fine-tuned head (the directory is also a run directory: ``config.json`` + ``model.pt``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from aggregator.finetune.checkpoint import CHECKPOINT
from aggregator.finetune.inputs import DecodedSource, FeatureMemory, InputCache, StoreFeatures
from aggregator.finetune.loop import HEAD_FILE, FinetuneSettings, distributed, finetune
from aggregator.finetune.maps import MAP_HEADS, StridedSource, build_map_model, map_channels
from aggregator.finetune.memory import choose_grad_frames
from aggregator.finetune.sources import TrainVideo
from aggregator.finetune.standardize import fit_standardizer
from aggregator.finetune.surrogate import FinetuneModel
from aggregator.heads import build_model
from aggregator.rundir import CONFIG_FILE, MODEL_FILE, write_json
from extractor.features import FeatureExtractor, resolve_dtype
from extractor.spec import BackboneSpec
from storage import FeatureStore

log = logging.getLogger(__name__)


def start_extractor(spec: BackboneSpec, device: torch.device, amp: bool) -> FeatureExtractor:
    """The starting backbones and flow backend, with the configuration a store would record
    (computing in bfloat16 with ``amp``, else float32, whatever ``spec.dtype`` says)."""
    return FeatureExtractor(replace(spec, dtype="bfloat16" if amp else "float32"), device=device)


def build_finetune_model(
    extractor: FeatureExtractor,
    *,
    head: str,
    num_classes: int,
    head_kwargs: Mapping[str, Any] | None = None,
    map_dim: int | None = None,
    map_seed: int = 0,
    standardize: bool = False,
) -> FinetuneModel:
    """The extractor's backbones + a head from :func:`aggregator.heads.build_model` (with an
    input standardiser, still the identity, when ``standardize``; not for map heads).

    A map head (``stpn``) reads the backbones' last block output, reduced to ``map_dim``
    channels by the projection ``framepool extract --map-dim`` uses (seeded with ``map_seed``).
    """
    maps = head in MAP_HEADS
    dims = dict(extractor.feature_dims)
    video_head = build_model(
        head,
        in_features=map_channels(dims, map_dim) if maps else dims,
        num_classes=num_classes,
        head_kwargs=head_kwargs,
        standardize=standardize and not maps,
    )
    backbones = {s: extractor.trainable_backbone(s) for s in extractor.streams}
    for b in backbones.values():
        b.requires_grad_(True)
    if maps:
        model = build_map_model(
            backbones, video_head, feature_dims=dims, dim=map_dim, seed=map_seed
        )
        return model.to(extractor.device)
    return FinetuneModel(backbones=backbones, head=video_head).to(extractor.device)


def run_finetune_job(
    videos: Mapping[str, str | Path],
    labels: Mapping[str, str],
    out_dir: str | Path,
    *,
    backbone: BackboneSpec,
    settings: FinetuneSettings,
    head: str = "tp",
    head_kwargs: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    store: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_frames: int | None = None,
    resume: bool = True,
    keep_inputs: bool = False,
    reuse_features: bool = False,
    map_dim: int | None = None,
    map_stride: int = 1,
    map_seed: int = 0,
    standardize: bool = True,
) -> list[dict[str, Any]]:
    """Fine-tune on ``videos`` (video id -> path) with ``labels`` (video id -> class name).

    ``cache_dir`` holds the decoded inputs (default ``out_dir/inputs``; the string ``"memory"``
    keeps them in memory); it is removed at the end unless ``keep_inputs``. With ``store``, the
    frames outside each epoch's subset read their features from it for every stream whose
    recorded extractor configuration equals the starting backbone's (others are computed).
    With ``reuse_features``, they read the features each video had at its previous step instead
    (:class:`aggregator.finetune.inputs.FeatureMemory` in ``out_dir/features``, or in memory
    with the in-memory input cache; removed at the end unless ``keep_inputs``).
    A map head (``stpn``, both streams) reads the backbones' last block output of every
    ``map_stride``-th frame, reduced to ``map_dim`` channels (see
    :mod:`aggregator.finetune.maps`); ``store`` and ``reuse_features`` do not apply to it.
    With ``standardize`` (not for map heads), the head standardises its inputs with statistics
    of the training videos under the starting backbones
    (:mod:`aggregator.finetune.standardize`).
    Returns the per-epoch history (see :func:`aggregator.finetune.loop.finetune`).
    """
    job = FinetuneJob(
        videos=videos,
        labels=labels,
        out=Path(out_dir),
        backbone=backbone,
        settings=settings,
        head=head,
        head_kwargs=dict(head_kwargs or {}),
        class_names=list(class_names) if class_names else None,
        device=torch.device(device),
        store=store,
        cache_dir=cache_dir,
        max_frames=max_frames,
        resume=resume,
        keep_inputs=keep_inputs,
        reuse_features=reuse_features,
        map_dim=map_dim,
        map_stride=map_stride,
        map_seed=map_seed,
        standardize=standardize,
    )
    return job.run()


@dataclass
class FinetuneJob:
    """The options of :func:`run_finetune_job` and its steps: :meth:`check` them, build the
    model, :meth:`open_inputs` (decoded up front), the run's :meth:`config`, the loop, then
    :meth:`finish` the run directory."""

    videos: Mapping[str, str | Path]
    labels: Mapping[str, str]
    out: Path
    backbone: BackboneSpec
    settings: FinetuneSettings
    head: str = "tp"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: str | Path | None = None
    cache_dir: str | Path | None = None
    max_frames: int | None = None
    resume: bool = True
    keep_inputs: bool = False
    reuse_features: bool = False
    map_dim: int | None = None
    map_stride: int = 1
    map_seed: int = 0
    standardize: bool = True

    @property
    def maps(self) -> dict[str, Any] | None:
        """A map head's ``{dim, stride, seed}``; None for a head on feature vectors."""
        if self.head not in MAP_HEADS:
            return None
        return {"dim": self.map_dim, "stride": self.map_stride, "seed": self.map_seed}

    def run(self) -> list[dict[str, Any]]:
        names = self.check()
        rank, _ = distributed()
        extractor = start_extractor(self.backbone, self.device, self.settings.amp)
        start_config = extractor.config()
        model = build_finetune_model(
            extractor,
            head=self.head,
            num_classes=len(names),
            head_kwargs=self.head_kwargs,
            map_dim=self.map_dim,
            map_seed=self.map_seed,
            standardize=self.standardize,
        )
        known = self.store_features(start_config)
        inputs = self.open_inputs(extractor, known)
        ids = sorted(self.videos)
        inputs.decode(ids)
        fresh = not (self.resume and (self.out / CHECKPOINT).exists())
        if self.standardize and self.maps is None and fresh:
            fit_standardizer(model, inputs.source, ids, chunk_size=self.settings.chunk_size)
        chunks = choose_grad_frames(
            model,
            inputs.source.frames(ids[0]),
            given=self.settings.grad_frames,
            autocast=self._autocast,
        )
        settings = replace(self.settings, grad_frames=chunks["grad_frames"])
        config = self.config(extractor, start_config, known, names, ids)
        config["backward_chunks"] = chunks
        source: Any = inputs.source
        if self.maps is not None:
            source = StridedSource(inputs.source, self.map_stride)
        history = finetune(
            model,
            [TrainVideo(v, names.index(self.labels[v])) for v in ids],
            source,
            settings,
            self.out,
            device=self.device,
            config=config,
            resume=self.resume,
        )
        finished = bool(history) and history[-1]["epoch"] >= self.settings.epochs
        if rank == 0 and finished:
            self.finish(extractor, inputs)
        return history

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.settings.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def check(self) -> list[str]:
        """The sorted class names (given, or the labels'); raises on a video without a label
        among them and on map options that do not fit the head."""
        if not self.videos:
            raise ValueError("no videos to fine-tune on")
        missing = sorted(set(self.videos) - set(self.labels))
        if missing:
            raise ValueError(f"videos without a label: {missing[:5]}")
        names = sorted(set(self.class_names) if self.class_names else set(self.labels.values()))
        unknown = sorted({self.labels[v] for v in self.videos} - set(names))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the class names {names}")
        if self.maps is None and (self.map_dim is not None or self.map_stride != 1):
            raise ValueError(
                f"map_dim and map_stride apply to map heads {MAP_HEADS}, not {self.head!r}"
            )
        if self.maps is not None and (self.store is not None or self.reuse_features):
            raise ValueError(
                f"head {self.head!r} reads spatial maps: stored or remembered feature vectors "
                "cannot stand in for them (drop the store and reuse_features)"
            )
        if self.map_stride < 1:
            raise ValueError(f"map_stride must be >= 1, got {self.map_stride!r}")
        return names

    def store_features(self, start_config: Mapping[str, Any]) -> StoreFeatures | None:
        """The store's features of the streams computed as the starting backbones compute them."""
        if self.store is None:
            return None
        known = StoreFeatures(FeatureStore.open(self.store, "r"), start_config, device=self.device)
        for stream, why in known.mismatch.items():
            log.warning(
                "store %s: %s stream %s; its features are computed without gradient",
                self.store,
                stream,
                why,
            )
        return known

    def open_inputs(self, extractor: FeatureExtractor, known: StoreFeatures | None) -> JobInputs:
        """The decoded-input cache and the feature memory, in their folders or in memory."""
        cache_dir, out = self.cache_dir, self.out
        in_memory = cache_dir is not None and str(cache_dir) == "memory"
        folder = None if in_memory else Path(cache_dir) if cache_dir is not None else out / "inputs"
        cache = InputCache(
            folder, streams=extractor.streams, flow=extractor.flow, max_frames=self.max_frames
        )
        memory_dir = None if folder is None else out / "features"
        memory = FeatureMemory(memory_dir) if self.reuse_features else None
        source = DecodedSource(self.videos, cache, device=self.device, store=known, memory=memory)
        return JobInputs(source, folder if folder == out / "inputs" else None, memory_dir)

    def config(
        self,
        extractor: FeatureExtractor,
        start_config: Mapping[str, Any],
        known: StoreFeatures | None,
        names: list[str],
        ids: list[str],
    ) -> dict[str, Any]:
        """The run's ``config.json`` as the loop writes it (:meth:`finish` adds the extractor)."""
        maps = self.maps
        backbone = self.backbone
        config: dict[str, Any] = {
            "run_id": self.out.name,
            "kind": "finetune",
            "head": self.head,
            "head_kwargs": dict(self.head_kwargs),
            "in_features": map_channels(extractor.feature_dims, self.map_dim)
            if maps is not None
            else dict(extractor.feature_dims),
            "num_classes": len(names),
            "fusion": "learned",
            "fusion_rule": "probabilities",
            "standardize": self.standardize and maps is None,
            "class_names": names,
            "videos": ids,
            "backbone": {
                "arch": backbone.arch,
                "weights": str(backbone.weights),
                "motion_weights": None
                if backbone.motion_weights is None
                else str(backbone.motion_weights),
                "flow": backbone.flow,
            },
            "start_extractor": start_config,
            "store": None if self.store is None else str(self.store),
            "store_streams": [] if known is None else known.streams,
            "max_frames": self.max_frames,
            "reuse_features": self.reuse_features,
        }
        if maps is not None:
            config["maps"] = maps
        return config

    def finish(self, start: FeatureExtractor, inputs: JobInputs) -> None:
        """Make the loop's output a run directory (``model.pt``, the tuned extractor's
        configuration) and remove the job's own input folders unless ``keep_inputs``."""
        shutil.copyfile(self.out / HEAD_FILE, self.out / MODEL_FILE)
        _record_finetuned_extractor(self.out, self.backbone, start, self.device, self.maps)
        if not self.keep_inputs:
            inputs.remove()


@dataclass
class JobInputs:
    """A job's decoded inputs (and remembered features), and the folders it removes at the end."""

    source: DecodedSource
    own_folder: Path | None  # the default input cache out_dir/inputs (None: elsewhere, memory)
    memory_dir: Path | None  # the feature memory's folder (None: in memory)

    def decode(self, ids: Sequence[str]) -> None:
        """Decode every video up front, each rank its share of the cache; the ranks then wait."""
        rank, world = distributed()
        for i, vid in enumerate(ids):
            if i % world == rank:
                self.source.prepared(vid)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def remove(self) -> None:
        if self.own_folder is not None:
            shutil.rmtree(self.own_folder, ignore_errors=True)
        if self.memory_dir is not None:
            shutil.rmtree(self.memory_dir, ignore_errors=True)


def _record_finetuned_extractor(
    out: Path,
    spec: BackboneSpec,
    start: FeatureExtractor,
    device: torch.device,
    maps: Mapping[str, Any] | None = None,
) -> None:
    """Add to ``config.json`` the extractor configuration ``framepool extract`` records with the
    fine-tuned backbones (what a re-extracted store's features must match to use this head).

    Its compute dtype is the one ``extract --dtype auto`` picks on this run's device type; pass
    it as ``--dtype`` when re-extracting elsewhere (see :func:`reextract_dtype`). With ``maps``
    (a map head's ``{dim, stride, seed}``) it adds the map streams' configuration, and the run's
    ``streams`` become the map streams the head reads (a run directory of a map head).
    """
    files = {s: out / f"backbone_{s}.pt" for s in start.streams}
    tuned_spec = replace(
        spec,
        streams=start.streams,
        weights=files.get("appearance", files.get("motion", "random")),
        motion_weights=files.get("motion"),
        dtype=resolve_dtype("auto", device),
    )
    tuned = FeatureExtractor(tuned_spec, device="cpu")
    if maps is not None:
        tuned.set_maps(
            ("appearance_map", "motion_map"),
            dim=maps["dim"],
            stride=int(maps["stride"]),
            seed=int(maps["seed"]),
        )
    path = out / CONFIG_FILE
    config = json.loads(path.read_text())
    config["extractor"] = tuned.config()
    if maps is not None:
        config["backbone_streams"] = config["streams"]
        config["streams"] = ["appearance_map", "motion_map"]
    write_json(path, config)


def reextract_dtype(out_dir: str | Path) -> str:
    """The compute dtype recorded for the fine-tuned backbones in ``out_dir/config.json``."""
    config = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    # map streams record their stored dtype (float16), not the backbone's compute dtype
    dtypes = {str(c["dtype"]) for c in config["extractor"].values() if "source_stream" not in c}
    if len(dtypes) != 1:
        raise ValueError(f"{str(out_dir)!r}: streams recorded with different dtypes {dtypes}")
    return dtypes.pop()
