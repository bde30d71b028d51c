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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aggregator.finetune.inputs import DecodedSource, FeatureMemory, InputCache, StoreFeatures
from aggregator.finetune.loop import (
    CHECKPOINT,
    FinetuneSettings,
    TrainVideo,
    distributed,
    finetune,
)
from aggregator.finetune.maps import MAP_HEADS, StridedSource, build_map_model, map_channels
from aggregator.finetune.standardize import fit_standardizer
from aggregator.finetune.surrogate import FinetuneModel
from aggregator.heads import build_model
from extractor.features import FeatureExtractor, resolve_dtype
from extractor.spec import BackboneSpec
from storage import FeatureStore

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"  # the head's weights under the name a run directory uses
HEAD_FILE = "head.pt"


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
    if not videos:
        raise ValueError("no videos to fine-tune on")
    missing = sorted(set(videos) - set(labels))
    if missing:
        raise ValueError(f"videos without a label: {missing[:5]}")
    names = sorted(set(class_names) if class_names else set(labels.values()))
    unknown = sorted({labels[v] for v in videos} - set(names))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the class names {names}")
    maps = head in MAP_HEADS
    if not maps and (map_dim is not None or map_stride != 1):
        raise ValueError(f"map_dim and map_stride apply to map heads {MAP_HEADS}, not {head!r}")
    if maps and (store is not None or reuse_features):
        raise ValueError(
            f"head {head!r} reads spatial maps: stored or remembered feature vectors cannot stand "
            "in for them (drop the store and reuse_features)"
        )
    if map_stride < 1:
        raise ValueError(f"map_stride must be >= 1, got {map_stride!r}")
    out = Path(out_dir)
    dev = torch.device(device)
    rank, _ = distributed()

    extractor = start_extractor(backbone, dev, settings.amp)
    start_config = extractor.config()
    model = build_finetune_model(
        extractor,
        head=head,
        num_classes=len(names),
        head_kwargs=head_kwargs,
        map_dim=map_dim,
        map_seed=map_seed,
        standardize=standardize,
    )
    known: StoreFeatures | None = None
    if store is not None:
        known = StoreFeatures(FeatureStore.open(store, "r"), start_config, device=dev)
        for stream, why in known.mismatch.items():
            log.warning(
                "store %s: %s stream %s; its features are computed without gradient",
                store,
                stream,
                why,
            )
    in_memory = cache_dir is not None and str(cache_dir) == "memory"
    folder = None if in_memory else Path(cache_dir) if cache_dir is not None else out / "inputs"
    cache = InputCache(
        folder, streams=extractor.streams, flow=extractor.flow, max_frames=max_frames
    )
    memory_dir = None if folder is None else out / "features"
    memory = FeatureMemory(memory_dir) if reuse_features else None
    source = DecodedSource(videos, cache, device=dev, store=known, memory=memory)
    train_source: Any = StridedSource(source, map_stride) if maps else source
    ids = sorted(videos)
    _, world = distributed()
    for i, vid in enumerate(ids):  # decode up front, each rank its share of the cache
        if i % world == rank:
            source.prepared(vid)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if standardize and not maps and not (resume and (out / CHECKPOINT).exists()):
        fit_standardizer(model, source, ids, chunk_size=settings.chunk_size)

    config: dict[str, Any] = {
        "run_id": out.name,
        "kind": "finetune",
        "head": head,
        "head_kwargs": dict(head_kwargs or {}),
        "in_features": map_channels(extractor.feature_dims, map_dim)
        if maps
        else dict(extractor.feature_dims),
        "num_classes": len(names),
        "fusion": "learned",
        "fusion_rule": "probabilities",
        "standardize": standardize and not maps,
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
        "store": None if store is None else str(store),
        "store_streams": [] if known is None else known.streams,
        "max_frames": max_frames,
        "reuse_features": reuse_features,
    }
    if maps:
        config["maps"] = {"dim": map_dim, "stride": map_stride, "seed": map_seed}
    history = finetune(
        model,
        [TrainVideo(v, names.index(labels[v])) for v in ids],
        train_source,
        settings,
        out,
        device=dev,
        config=config,
        resume=resume,
    )
    finished = bool(history) and history[-1]["epoch"] >= settings.epochs
    if rank == 0 and finished:
        shutil.copyfile(out / HEAD_FILE, out / MODEL_FILE)
        _record_finetuned_extractor(out, backbone, extractor, dev, config.get("maps"))
        if not keep_inputs and folder is not None and folder == out / "inputs":
            shutil.rmtree(folder, ignore_errors=True)
        if not keep_inputs and memory_dir is not None:
            shutil.rmtree(memory_dir, ignore_errors=True)
    return history


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
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["extractor"] = tuned.config()
    if maps is not None:
        config["backbone_streams"] = config["streams"]
        config["streams"] = ["appearance_map", "motion_map"]
    path.write_text(json.dumps(config, indent=2))


def reextract_dtype(out_dir: str | Path) -> str:
    """The compute dtype recorded for the fine-tuned backbones in ``out_dir/config.json``."""
    config = json.loads((Path(out_dir) / "config.json").read_text())
    # map streams record their stored dtype (float16), not the backbone's compute dtype
    dtypes = {str(c["dtype"]) for c in config["extractor"].values() if "source_stream" not in c}
    if len(dtypes) != 1:
        raise ValueError(f"{str(out_dir)!r}: streams recorded with different dtypes {dtypes}")
    return dtypes.pop()
