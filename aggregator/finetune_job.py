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

from aggregator.finetune import FinetuneModel
from aggregator.finetune_inputs import DecodedSource, FeatureMemory, InputCache, StoreFeatures
from aggregator.finetune_train import (
    FinetuneSettings,
    TrainVideo,
    distributed,
    finetune,
)
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
) -> FinetuneModel:
    """The extractor's backbones + a head from :func:`aggregator.heads.build_model`."""
    video_head = build_model(
        head,
        in_features=dict(extractor.feature_dims),
        num_classes=num_classes,
        head_kwargs=head_kwargs,
    )
    backbones = {s: extractor.trainable_backbone(s) for s in extractor.streams}
    for b in backbones.values():
        b.requires_grad_(True)
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
) -> list[dict[str, Any]]:
    """Fine-tune on ``videos`` (video id -> path) with ``labels`` (video id -> class name).

    ``cache_dir`` holds the decoded inputs (default ``out_dir/inputs``; the string ``"memory"``
    keeps them in memory); it is removed at the end unless ``keep_inputs``. With ``store``, the
    frames outside each epoch's subset read their features from it for every stream whose
    recorded extractor configuration equals the starting backbone's (others are computed).
    With ``reuse_features``, they read the features each video had at its previous step instead
    (:class:`aggregator.finetune_inputs.FeatureMemory` in ``out_dir/features``, or in memory
    with the in-memory input cache; removed at the end unless ``keep_inputs``).
    Returns the per-epoch history (see :func:`aggregator.finetune_train.finetune`).
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
    out = Path(out_dir)
    dev = torch.device(device)
    rank, _ = distributed()

    extractor = start_extractor(backbone, dev, settings.amp)
    start_config = extractor.config()
    model = build_finetune_model(
        extractor, head=head, num_classes=len(names), head_kwargs=head_kwargs
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
    ids = sorted(videos)
    _, world = distributed()
    for i, vid in enumerate(ids):  # decode up front, each rank its share of the cache
        if i % world == rank:
            source.prepared(vid)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

    config: dict[str, Any] = {
        "run_id": out.name,
        "kind": "finetune",
        "head": head,
        "head_kwargs": dict(head_kwargs or {}),
        "in_features": dict(extractor.feature_dims),
        "num_classes": len(names),
        "fusion": "learned",
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
    history = finetune(
        model,
        [TrainVideo(v, names.index(labels[v])) for v in ids],
        source,
        settings,
        out,
        device=dev,
        config=config,
        resume=resume,
    )
    finished = bool(history) and history[-1]["epoch"] >= settings.epochs
    if rank == 0 and finished:
        shutil.copyfile(out / HEAD_FILE, out / MODEL_FILE)
        _record_finetuned_extractor(out, backbone, extractor, dev)
        if not keep_inputs and folder is not None and folder == out / "inputs":
            shutil.rmtree(folder, ignore_errors=True)
        if not keep_inputs and memory_dir is not None:
            shutil.rmtree(memory_dir, ignore_errors=True)
    return history


def _record_finetuned_extractor(
    out: Path, spec: BackboneSpec, start: FeatureExtractor, device: torch.device
) -> None:
    """Add to ``config.json`` the extractor configuration ``framepool extract`` records with the
    fine-tuned backbones (what a re-extracted store's features must match to use this head).

    Its compute dtype is the one ``extract --dtype auto`` picks on this run's device type; pass
    it as ``--dtype`` when re-extracting elsewhere (see :func:`reextract_dtype`).
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
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["extractor"] = tuned.config()
    path.write_text(json.dumps(config, indent=2))


def reextract_dtype(out_dir: str | Path) -> str:
    """The compute dtype recorded for the fine-tuned backbones in ``out_dir/config.json``."""
    config = json.loads((Path(out_dir) / "config.json").read_text())
    dtypes = {str(c["dtype"]) for c in config["extractor"].values()}
    if len(dtypes) != 1:
        raise ValueError(f"{str(out_dir)!r}: streams recorded with different dtypes {dtypes}")
    return dtypes.pop()
