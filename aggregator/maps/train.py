"""Train a head that reads spatial map streams (``stpn``) and write a run directory.

The same protocol as :func:`aggregator.train.train_run` (a stratified, seeded validation part of
the training split selects the epoch and stops early; the test split is evaluated once, with the
selected weights), the same run files (``config.json``, ``model.pt``, ``metrics.json``, plots),
but the inputs are padded map batches ``{stream: [B, T', h, w, C]}`` from
:mod:`aggregator.maps.data` instead of node summaries. Plots add the attention maps of a few test
videos.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from aggregator import plots
from aggregator.data import open_store
from aggregator.heads import SpatiotemporalPyramid, VideoModel, build_model
from aggregator.maps.data import MapDataset, map_loader
from aggregator.maps.predict import predict_maps
from aggregator.maps.probes import map_probes
from aggregator.metrics import chance_warnings, classification_metrics
from aggregator.rundir import (
    CONFIG_FILE,
    MODEL_FILE,
    LabelledSplits,
    labelled_splits,
    make_run_config,
    save_torch,
    write_json,
    write_metrics,
)
from aggregator.streams import MAP_STREAMS
from aggregator.train_config import MapTrainConfig
from aggregator.train_loop import fit_epoch, param_groups
from extractor.runtime import resolve_device, seeded_run
from storage import FeatureStore

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 2 << 30  # map streams up to this size (float16) stay in memory after epoch 1


def train_map_run(
    store_path: str | Path,
    out_dir: str | Path,
    config: MapTrainConfig | None = None,
    *,
    make_plots: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Train ``config.head`` on the store's ``appearance_map`` and ``motion_map`` streams.

    ``config`` holds the options (:class:`aggregator.train_config.MapTrainConfig`); keyword
    ``options`` replace its fields. Adam with cosine decay per step and L2 weight decay on weight
    matrices, as :func:`aggregator.train.train_run`. ``val_groups`` holds out the validation
    part as the deep heads do (:func:`aggregator.rundir.labelled_splits`: whole groups when the
    videos have them). Returns the metrics written to ``metrics.json``.
    """
    t_start = time.perf_counter()
    config = config or MapTrainConfig()
    if options:
        config = config.replace(**options)
    dev = resolve_device(config.device)
    with seeded_run(config.seed, config.threads):
        store = open_store(str(store_path), writable=False)
        return _train(store, Path(out_dir), config, dev, make_plots, t_start)


def _map_dims(store: FeatureStore, video_id: str) -> dict[str, int]:
    have = store.streams(video_id)
    missing = [s for s in MAP_STREAMS if s not in have]
    if missing:
        raise ValueError(
            f"stpn reads the map streams {list(MAP_STREAMS)}; video {video_id!r} in "
            f"{store.path!r} has {have}. Extract them with framepool extract --streams "
            "appearance,motion,appearance_map,motion_map"
        )
    return {s: int(store.read(video_id, s, dtype=np.float16).shape[-1]) for s in MAP_STREAMS}


def _map_bytes(store: FeatureStore, video_ids: list[str]) -> int:
    """float16 bytes of the map streams of ``video_ids``, from the first video's shape."""
    first = store.read(video_ids[0], MAP_STREAMS[0], dtype=np.float16)
    return 2 * len(MAP_STREAMS) * len(video_ids) * int(first.size)


def _train(
    store: FeatureStore,
    out: Path,
    config: MapTrainConfig,
    dev: torch.device,
    make_plots: bool,
    t_start: float,
) -> dict[str, Any]:
    splits = labelled_splits(
        store,
        config.train_split,
        config.test_split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        val_groups=config.val_groups,
    )
    class_names = splits.class_names
    in_features = _map_dims(store, splits.train_ids[0])
    model = build_model(
        config.head,
        in_features=in_features,
        num_classes=len(class_names),
        head_kwargs=config.head_kwargs,
    )
    assert isinstance(model, SpatiotemporalPyramid)
    config_json = _run_config(store, out, config, in_features, splits)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, config_json)

    t_data = time.perf_counter()
    in_memory = _map_bytes(store, splits.train_ids) <= IN_MEMORY_BYTES

    def dataset(ids: list[str], labels: np.ndarray) -> MapDataset:
        return MapDataset(
            store, ids, MAP_STREAMS, labels, max_frames=config.max_frames, in_memory=in_memory
        )

    fit_set = dataset(splits.fit_ids, splits.y_fit)
    val_set = dataset(splits.val_ids, splits.y_val)
    test_set = dataset(list(splits.test_ids), splits.y_test)
    seconds_data = time.perf_counter() - t_data

    fit = _fit(model, fit_set, val_set, config, dev)
    metrics = _test_metrics(model, test_set, class_names, dev)
    metrics.update(
        run_id=config_json["run_id"],
        head=config.head,
        streams=list(MAP_STREAMS),
        n_train=len(fit_set),
        n_val=len(val_set),
        n_test=len(test_set),
        epochs_run=len(fit.history),
        best_epoch=fit.best_epoch,
        val_top1=fit.val_top1,
        seconds_data=seconds_data,
        seconds_train=fit.seconds,
        history=fit.history,
    )
    probes, check, warnings = map_probes(store, MAP_STREAMS, splits, fit.val_top1, seed=config.seed)
    warnings += chance_warnings(metrics, len(class_names))
    for w in warnings:
        log.warning("%s: %s", config.head, w)
    metrics.update(probe=probes, probe_check=check, warnings=warnings)
    model.cpu()
    save_torch(model.state_dict(), out / MODEL_FILE)
    if make_plots:
        metrics["plots"] = _plots(model, test_set, metrics, class_names, out)
    return write_metrics(out, metrics, t_start)


def _run_config(
    store: FeatureStore,
    out: Path,
    config: MapTrainConfig,
    in_features: dict[str, int],
    splits: LabelledSplits,
) -> dict[str, Any]:
    """The run's ``config.json``, with its run id."""
    model_fields = {
        "head_kwargs": config.head_kwargs,
        "in_features": in_features,
        "num_classes": len(splits.class_names),
        "streams": list(MAP_STREAMS),
    }
    # the map streams and the backbones that compute them (a service rebuilds them all)
    extractor = {
        s: store.extractor.get(s)
        for s in ("appearance", "motion", *MAP_STREAMS)
        if s in MAP_STREAMS or store.extractor.get(s) is not None
    }
    return make_run_config(
        out,
        store,
        config.head,
        model_fields,
        extractor=extractor,
        splits=splits,
        train_args=config.to_dict(),
    )


@dataclass
class _Fit:
    """What :func:`_fit` leaves: the per-epoch history and the selected epoch."""

    history: list[dict[str, Any]]
    best_epoch: int
    val_top1: float | None  # the selected epoch's validation top-1 (None: no validation)
    seconds: float


def _fit(
    model: SpatiotemporalPyramid,
    fit_set: MapDataset,
    val_set: MapDataset,
    config: MapTrainConfig,
    dev: torch.device,
) -> _Fit:
    """Adam with cosine decay per step; after every epoch the validation part picks the best
    weights (top-1, then lower loss) and stops after ``patience`` epochs without improvement.
    The model ends with the best weights (the last ones without a validation part)."""
    model.to(dev)
    groups = param_groups(model, config.lr, config.weight_decay, 1.0)
    opt = torch.optim.Adam(groups, lr=config.lr)
    steps = max(1, math.ceil(len(fit_set) / config.batch_size)) * config.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    train_loader = map_loader(fit_set, batch_size=config.batch_size, shuffle=True, seed=config.seed)

    history: list[dict[str, Any]] = []
    best: tuple[float, float] = (-1.0, -math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, stale = 0, 0
    t_train = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t_epoch = time.perf_counter()
        batches = (((b.features, b.lengths), b.labels) for b in train_loader)
        # fit_epoch calls forward(x, lengths), the contract every head keeps
        loss, top1 = fit_epoch(
            cast(VideoModel, model), batches, opt, sched, device=dev, grad_clip=config.grad_clip
        )
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss,
            "train_top1": top1,
            "lr": opt.param_groups[0]["lr"],
        }
        if len(val_set):
            logits, y = predict_maps(model, val_set, device=dev)
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
            val_top1 = float((logits.argmax(1) == y).mean())
            record.update(val_loss=val_loss, val_top1=val_top1)
            if (val_top1, -val_loss) > best:
                best, best_epoch, stale = (val_top1, -val_loss), epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        record["seconds"] = time.perf_counter() - t_epoch
        history.append(record)
        log.info("epoch %d %s", epoch, {k: round(v, 4) for k, v in record.items()})
        if config.patience and len(val_set) and stale >= config.patience:
            break
    seconds = time.perf_counter() - t_train
    if best_state is None:
        return _Fit(history, len(history), None, seconds)
    model.load_state_dict(best_state)
    return _Fit(history, best_epoch, best[0], seconds)


def _test_metrics(
    model: SpatiotemporalPyramid, test_set: MapDataset, class_names: list[str], dev: torch.device
) -> dict[str, Any]:
    """Classification metrics of the test split (empty ones without a test split)."""
    if len(test_set):
        logits, y = predict_maps(model, test_set, device=dev)
        return classification_metrics(logits, y, class_names)
    return classification_metrics(np.zeros((0, len(class_names))), np.zeros(0), class_names)


def _plots(
    model: SpatiotemporalPyramid,
    test_set: MapDataset,
    metrics: dict[str, Any],
    class_names: list[str],
    out: Path,
) -> list[str]:
    """Training curves, the confusion matrix and a few test videos' attention; the file names."""
    written = [
        plots.plot_history(metrics["history"], out / "training_curves.png"),
        plots.plot_confusion(metrics["confusion_matrix"], class_names, out / "confusion.png"),
    ]
    if len(test_set):
        written.append(plot_attention(model, test_set, out / "attention.png"))
    return [p.name for p in written]


@torch.no_grad()
def plot_attention(
    model: SpatiotemporalPyramid,
    data: MapDataset,
    path: str | Path,
    *,
    videos: int = 3,
    frames: int = 6,
) -> Path:
    """The attention weights over the cells of a few frames of the first ``videos`` videos."""
    model.eval()
    n = min(videos, len(data))
    items = [data[i] for i in range(n)]
    fig = Figure(figsize=(1.6 * frames + 1.0, 1.7 * n + 0.4))
    axes = np.atleast_2d(fig.subplots(n, frames, squeeze=False))
    for row, item in enumerate(items):
        x = {s: t[None].float() for s, t in item["features"].items()}
        t = int(next(iter(x.values())).shape[1])
        alpha = model.attention_weights(x, torch.tensor([t]))[0].numpy()  # [T, h, w]
        shown = np.unique(np.round(np.linspace(0, t - 1, min(frames, t))).astype(int))
        for col in range(frames):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(shown):
                ax.imshow(alpha[shown[col]], cmap="magma", vmin=0.0)
                ax.set_title(f"map frame {shown[col]}", fontsize=7)
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(str(item["video_id"])[:18], fontsize=7)
    fig.suptitle("stpn attention over the cells (softmax weights)", fontsize=9)
    return plots._save(fig, path)
