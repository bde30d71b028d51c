"""Train a pooling head on cached features and write a run directory.

The backbone is not in the loop: node-only heads read the store's node cache once into memory
(``[n, M, d]`` per stream) and every epoch is a few large matmuls over it. A validation part is
carved from the training split (stratified, seeded) for model selection and early stopping; the
test split is evaluated once, with the selected weights, and never steers a choice.

A run directory holds ``config.json`` (everything needed to rebuild and to rerun: head and its
keyword arguments, streams, store path and extractor config, class names, splits, seed and
training options), ``model.pt`` (a state dict, loadable with ``torch.load(weights_only=True)``),
``metrics.json`` and PNG plots.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from aggregator import plots
from aggregator.data import (
    NodeTensors,
    frame_loader,
    label_indices,
    load_node_tensors,
    open_store,
    split_videos,
    stratified_holdout,
)
from aggregator.heads import (
    HEADS,
    AdaptiveTemporalPooling,
    TemporalPyramid,
    TwoStream,
    VideoModel,
    build_model,
)
from aggregator.metrics import beta_by_level, classification_metrics
from storage import FeatureStore

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2}


def fp32_budget() -> int:
    """Bytes of node tensors held as float32 (else float16, converted batch by batch): a third of
    the memory available now, 4 GiB where that cannot be read."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 3
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {device!r}")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 matmuls: CUDA with bf16, or a CPU with AVX512-BF16/AMX (oneDNN)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where bfloat16 is native, else ``fp32``."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))  # noqa: NPY002 - for code that uses the global state
    torch.manual_seed(seed)


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """NaN/inf -> None so that metrics.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, simplex_lr_scale: float
) -> list[dict[str, Any]]:
    """L2 weight decay on weight matrices only (not on biases, norms, beta or fusion weights).

    The softmax logits of beta and of the fusion weights get ``simplex_lr_scale`` times the
    learning rate: they are a handful of numbers that must move by O(1) to matter, which at
    Adam's step of about ``lr`` per update would take thousands of updates.
    """
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    simplex: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("beta_hat") or name.endswith("fusion_logits"):
            simplex.append(p)
        else:
            (plain if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": plain, "weight_decay": 0.0, "lr": lr},
        {"params": simplex, "weight_decay": 0.0, "lr": lr * simplex_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def model_betas(model: VideoModel) -> dict[str, list[list[float]]]:
    """``{stream: beta level by level}`` for the streams whose head learns node weights."""
    out: dict[str, list[list[float]]] = {}
    if isinstance(model, TwoStream):
        for s in model.streams:
            head = model.stream_head(s)
            if isinstance(head, TemporalPyramid):
                out[s] = head.beta()
    return out


def model_beta_matrices(model: VideoModel) -> dict[str, np.ndarray]:
    """``{stream: [P, M] beta}`` for the plot."""
    out: dict[str, np.ndarray] = {}
    if isinstance(model, TwoStream):
        for s in model.streams:
            head = model.stream_head(s)
            if isinstance(head, TemporalPyramid):
                out[s] = head.beta_matrix().double().numpy()
    return out


def fusion_weights_of(model: VideoModel) -> dict[str, float] | None:
    return model.fusion_weights() if isinstance(model, TwoStream) else None


def pyramid_leaf_streams(model: VideoModel) -> list[str]:
    """Streams whose head takes pyramid nodes as :class:`PyramidLeaves` (the temporal pyramid)."""
    if not isinstance(model, TwoStream):
        return []
    return [s for s in model.streams if isinstance(model.stream_head(s), TemporalPyramid)]


def fit_epoch(
    model: VideoModel,
    batches: Iterable[tuple[Any, torch.Tensor]],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    device: torch.device | str = "cpu",
    grad_clip: float | None = None,
    bf16: bool = False,
) -> tuple[float, float]:
    """One pass of optimisation; returns the mean training loss and top-1 over the pass.

    ``batches`` yields ``(inputs, labels)`` with ``inputs`` either node summaries
    ``{stream: [B, M, d] or PyramidLeaves}`` or padded frames ``({stream: [B, T, d]}, lengths)``.
    """
    dev = torch.device(device)
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, y in batches:
        y = y.to(dev)
        if len(y) < 2:
            continue  # batch norm needs two samples; a lone leftover video waits a turn
        amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with amp:
            if isinstance(inputs, tuple):
                feats, lengths = inputs
                logits = model({s: t.to(dev) for s, t in feats.items()}, lengths.to(dev))
            else:
                logits = model.forward_nodes(inputs)
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def predict_nodes(
    model: VideoModel,
    data: NodeTensors,
    index: np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    per_stream: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``[n, C]`` of the rows ``index`` (and each stream's own logits when asked)."""
    model.eval()
    out: list[torch.Tensor] = []
    streams_out: dict[str, list[torch.Tensor]] = {}
    for nodes, _, _ in data.batches(index, batch_size, dtype=dtype, device=device):
        out.append(model.forward_nodes(nodes).float().cpu())
        if per_stream and isinstance(model, TwoStream):
            for s, v in model.stream_logits(nodes).items():
                streams_out.setdefault(s, []).append(v.float().cpu())
    c = model.out_features
    logits = torch.cat(out).numpy() if out else np.zeros((0, c), dtype=np.float32)
    return logits, {s: torch.cat(v).numpy() for s, v in streams_out.items()}


def _run_id(out: Path, config: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{out.resolve().name}-{digest[:8]}"


def train_run(
    store_path: str | Path,
    out_dir: str | Path,
    *,
    head: str = "tp",
    streams: Sequence[str] = ("appearance",),
    head_kwargs: Mapping[str, Any] | None = None,
    fusion: Literal["learned", "fixed"] | None = None,
    fusion_weights: Mapping[str, float] | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    val_fraction: float = 0.1,
    epochs: int = 30,
    batch_size: int = 128,
    optimizer: Literal["adam", "sgd"] = "adam",
    lr: float | None = None,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    simplex_lr_scale: float = 10.0,
    schedule: Literal["cosine", "constant"] = "cosine",
    patience: int | None = 10,
    grad_clip: float | None = 40.0,
    seed: int = 0,
    device: str = "auto",
    inputs: Literal["nodes", "frames"] = "nodes",
    pyramid_leaves: bool = True,
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    threads: int | None = None,
    make_plots: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``head`` on the store's features, evaluate on ``test_split``, write ``out_dir``.

    Args:
        store_path: the feature store (opened writable when possible, to keep the node cache).
        out_dir: the run directory (created; existing run files are overwritten).
        head: a key of :data:`aggregator.heads.HEADS` (``gap``, ``max``, ``tp``, ``tpp``, ``datp``,
            ``stcb``).
        streams: stream names; several streams are fused (learned weights; fixed 0.5/0.5 for
            ``tpp`` as in DTPP unless ``fusion`` says otherwise).
        head_kwargs: the head class's keyword arguments, e.g. ``{"depth": 6, "variant": "concat",
            "pyramids": 1}`` for ``tp``.
        val_fraction: share of every class of the training split held out for model selection
            (best validation top-1, ties to lower loss) and early stopping (``patience`` epochs);
            0 trains on everything and keeps the last epoch.
        optimizer, lr, weight_decay, momentum, schedule, grad_clip: Adam (lr 1e-3) or SGD with
            momentum (lr 1e-2), L2 weight decay on weight matrices, cosine decay per step, gradient
            norm clipping (40 as in DTPP). The softmax logits of beta and of the fusion weights
            learn ``simplex_lr_scale`` times faster.
        inputs: ``nodes`` (cached summaries in memory, the fast path) or ``frames`` (padded frames
            through a DataLoader; same model, same result up to float rounding, much slower).
        pyramid_leaves: hold the temporal pyramid's nodes as their leaves (the last level) and
            apply its linear maps to those before mixing them into nodes: exact, half the
            FLOPs and half the memory of the node tensors.
        precision: ``bf16`` trains under bfloat16 autocast (node tensors held at the cache's
            float16); ``auto`` picks it on CUDA with bfloat16 and on CPUs with native bfloat16
            (AVX512-BF16/AMX), else ``fp32``. Validation and test always run in float32, as
            :func:`aggregator.runs.load_run` does.
        threads: torch CPU threads for the run (restored afterwards).

    Returns:
        The metrics written to ``metrics.json``.
    """
    t_start = time.perf_counter()
    if head == "stpn":  # reads the spatial map streams, through its own loader
        from aggregator.map_train import train_map_run

        return train_map_run(
            store_path,
            out_dir,
            head_kwargs=head_kwargs,
            train_split=train_split,
            test_split=test_split,
            val_fraction=val_fraction,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            patience=patience,
            grad_clip=grad_clip,
            seed=seed,
            device=device,
            threads=threads,
            make_plots=make_plots,
        )
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {sorted(HEADS)}")
    streams = list(dict.fromkeys(streams))
    if not streams:
        raise ValueError("no stream given")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if inputs not in ("nodes", "frames"):
        raise ValueError(f"inputs must be 'nodes' or 'frames', got {inputs!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    fusion = fusion or ("fixed" if head == "tpp" else "learned")
    head_kwargs = dict(head_kwargs or {})
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    train_args = {
        "head": head,
        "streams": streams,
        "head_kwargs": head_kwargs,
        "fusion": fusion,
        "fusion_weights": dict(fusion_weights) if fusion_weights else None,
        "train_split": train_split,
        "test_split": test_split,
        "val_fraction": val_fraction,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "simplex_lr_scale": simplex_lr_scale,
        "schedule": schedule,
        "patience": patience,
        "grad_clip": grad_clip,
        "seed": seed,
        "device": device,
        "inputs": inputs,
        "pyramid_leaves": pyramid_leaves,
        "precision": precision,
        "threads": threads,
    }
    dev = resolve_device(device)
    train_args["precision"] = resolve_precision(precision, dev)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        seed_everything(seed)
        store = open_store(str(store_path))
        return _train(store, Path(out_dir), train_args, dev, make_plots, progress, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _train(
    store: FeatureStore,
    out: Path,
    args: dict[str, Any],
    dev: torch.device,
    make_plots: bool,
    progress: bool,
    t_start: float,
) -> dict[str, Any]:
    streams: list[str] = args["streams"]
    seed: int = args["seed"]
    class_names = store.class_names
    if not class_names:
        raise ValueError(f"store {store.path!r} has no class names (no labelled video)")
    train_ids = split_videos(store, args["train_split"])
    test_ids = split_videos(store, args["test_split"]) if args["test_split"] else []
    overlap = sorted(set(train_ids) & set(test_ids))
    if overlap:
        raise ValueError(
            f"splits {args['train_split']!r} and {args['test_split']!r} share {len(overlap)} "
            f"videos, e.g. {overlap[0]!r}"
        )
    y_train = label_indices(store, train_ids, class_names)
    y_test = label_indices(store, test_ids, class_names)
    fit_idx, val_idx = stratified_holdout(y_train, args["val_fraction"], seed)
    for s in streams:
        if s not in store.streams(train_ids[0]):
            raise ValueError(
                f"stream {s!r} is not in store {store.path!r}; video {train_ids[0]!r} has "
                f"{store.streams(train_ids[0])}"
            )
    in_features = {s: int(store.read(train_ids[0], s).shape[1]) for s in streams}
    model = build_model(
        args["head"],
        in_features=in_features,
        num_classes=len(class_names),
        head_kwargs=args["head_kwargs"],
        fusion=args["fusion"],
        fusion_weights=args["fusion_weights"],
    )
    specs = model.input_specs
    config: dict[str, Any] = {
        "format": "framepool-run/1",
        "head": args["head"],
        "head_kwargs": args["head_kwargs"],
        "in_features": in_features,
        "num_classes": len(class_names),
        "fusion": args["fusion"],
        "fusion_weights": args["fusion_weights"],
        "streams": streams,
        "input_specs": {s: spec.to_dict() for s, spec in specs.items()},
        "store": store.path if "://" in store.path else os.path.abspath(store.path),
        "extractor": {s: store.extractor.get(s) for s in streams},
        "class_names": class_names,
        "splits": {
            "train": args["train_split"],
            "test": args["test_split"],
            "val_fraction": args["val_fraction"],
            "validation_ids": [train_ids[i] for i in val_idx],
        },
        "seed": seed,
        "train_args": args,
    }
    config["run_id"] = _run_id(out, config)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, config)

    # ---- data
    t_data = time.perf_counter()
    # rows in memory: the videos to fit first, in a seeded random order (training batches are
    # windows of them, see NodeTensors.batches), then validation, then test
    fit_idx = fit_idx[np.random.default_rng(seed).permutation(len(fit_idx))]
    all_ids = [train_ids[i] for i in fit_idx] + [train_ids[i] for i in val_idx] + list(test_ids)
    labels_all = np.concatenate([y_train[fit_idx], y_train[val_idx], y_test]).astype(np.int64)
    n_fit, n_val = len(fit_idx), len(val_idx)
    rows_fit = np.arange(n_fit)
    rows_val = np.arange(n_fit, n_fit + n_val)
    rows_test = np.arange(n_fit + n_val, len(all_ids))
    bf16 = args["precision"] == "bf16"
    data: NodeTensors | None = None
    hold = torch.float32
    if args["inputs"] == "nodes":
        leaves = pyramid_leaf_streams(model) if args["pyramid_leaves"] else []
        counts = {
            s: (1 << (len(specs[s].parts) - 1)) if s in leaves else specs[s].count for s in streams
        }
        n_bytes = 4 * len(all_ids) * sum(counts[s] * in_features[s] for s in streams)
        # bf16 keeps the cache's float16 (batches converted as they go); fp32 while it fits
        hold = torch.float32 if not bf16 and n_bytes <= fp32_budget() else torch.float16
        data = load_node_tensors(
            store, all_ids, labels_all, specs, dtype=hold, leaves=leaves, progress=progress
        )
    seconds_data = time.perf_counter() - t_data
    compute_dtype = torch.bfloat16 if bf16 else torch.float32

    # ---- optimisation
    model.to(dev)
    groups = param_groups(model, args["lr"], args["weight_decay"], args["simplex_lr_scale"])
    opt: torch.optim.Optimizer
    if args["optimizer"] == "adam":
        opt = torch.optim.Adam(groups, lr=args["lr"])
    else:
        opt = torch.optim.SGD(groups, lr=args["lr"], momentum=args["momentum"])
    steps_per_epoch = max(1, math.ceil(len(rows_fit) / args["batch_size"]))
    total_steps = steps_per_epoch * args["epochs"]
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if args["schedule"] == "cosine"
        else None
    )

    gen = torch.Generator().manual_seed(seed)
    frames_train = None
    if data is None:
        frames_train = frame_loader(
            store,
            [all_ids[i] for i in rows_fit],
            streams,
            labels_all[rows_fit],
            batch_size=args["batch_size"],
            shuffle=True,
            seed=seed,
        )

    def evaluate(rows: np.ndarray, per_stream: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        # float32, as a loaded run predicts: the test metrics are what `evaluate` reproduces
        if data is not None:
            return predict_nodes(
                model, data, rows, device=dev, dtype=torch.float32, per_stream=per_stream
            )
        return _predict_frames(model, store, [all_ids[i] for i in rows], streams, dev)

    history: list[dict[str, Any]] = []
    best: tuple[float, float] = (-1.0, -math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    stale = 0
    t_train = time.perf_counter()
    for epoch in range(1, args["epochs"] + 1):
        t_epoch = time.perf_counter()
        if data is not None:
            batches: Any = (
                (nodes, y)
                for nodes, y, _ in data.batches(
                    rows_fit,
                    args["batch_size"],
                    windows=True,
                    generator=gen,
                    dtype=compute_dtype,
                    device=dev,
                )
            )
        else:
            assert frames_train is not None
            batches = (((b.features, b.lengths), b.labels) for b in frames_train)
        train_loss, train_top1 = fit_epoch(
            model, batches, opt, sched, device=dev, grad_clip=args["grad_clip"], bf16=bf16
        )
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_top1": train_top1,
            "lr": opt.param_groups[0]["lr"],
        }
        if len(rows_val):
            val_logits, _ = evaluate(rows_val)
            y_val = torch.from_numpy(labels_all[rows_val])
            val_loss = float(F.cross_entropy(torch.from_numpy(val_logits).float(), y_val))
            val_top1 = float((val_logits.argmax(1) == labels_all[rows_val]).mean())
            record.update(val_loss=val_loss, val_top1=val_top1)
            score = (val_top1, -val_loss)
            if score > best:
                best, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        record["seconds"] = time.perf_counter() - t_epoch
        history.append(record)
        log.info("epoch %d %s", epoch, {k: round(v, 4) for k, v in record.items()})
        if args["patience"] is not None and len(rows_val) and stale >= args["patience"]:
            log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
            break
    seconds_train = time.perf_counter() - t_train
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)

    # ---- test, once, with the selected weights
    per_stream_metrics: dict[str, Any] = {}
    if len(rows_test):
        test_logits, stream_logits = evaluate(rows_test, per_stream=True)
        metrics = classification_metrics(test_logits, labels_all[rows_test], class_names)
        for s, lg in stream_logits.items():
            m = classification_metrics(lg, labels_all[rows_test], class_names)
            per_stream_metrics[s] = {k: m[k] for k in ("top1", "top5", "mean_class_accuracy")}
    else:
        metrics = classification_metrics(np.zeros((0, len(class_names))), np.zeros(0), class_names)
    metrics.update(
        run_id=config["run_id"],
        head=args["head"],
        streams=streams,
        n_train=len(rows_fit),
        n_val=len(rows_val),
        n_test=len(rows_test),
        epochs_run=len(history),
        best_epoch=best_epoch,
        precision=args["precision"],
        node_dtype=str(hold).removeprefix("torch.") if data is not None else None,
        pyramid_leaves=sorted(data.mix) if data is not None else [],
        val_top1=best[0] if best_state is not None else None,
        beta=model_betas(model) or None,
        fusion_weights=fusion_weights_of(model),
        per_stream=per_stream_metrics or None,
        seconds_data=seconds_data,
        seconds_train=seconds_train,
        history=history,
    )
    betas = model_beta_matrices(model)
    if any(b.shape[0] > 1 for b in betas.values()):
        metrics["beta_pyramids"] = {s: [beta_by_level(row) for row in b] for s, b in betas.items()}
    model.cpu()
    tmp = out / (MODEL_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out / MODEL_FILE)
    if make_plots:
        t_plots = time.perf_counter()
        metrics["plots"] = _plots(model, out, metrics, betas, data, rows_test, all_ids, class_names)
        metrics["seconds_plots"] = time.perf_counter() - t_plots
    metrics["seconds"] = time.perf_counter() - t_start
    metrics = _finite(metrics)
    write_json(out / METRICS_FILE, metrics)
    return metrics


@torch.no_grad()
def _predict_frames(
    model: VideoModel,
    store: FeatureStore,
    video_ids: list[str],
    streams: list[str],
    dev: torch.device,
) -> tuple[np.ndarray, dict[str, Any]]:
    model.eval()
    out = []
    for batch in frame_loader(store, video_ids, streams, batch_size=32):
        feats = {s: t.to(dev) for s, t in batch.features.items()}
        out.append(model(feats, batch.lengths.to(dev)).float().cpu())
    return torch.cat(out).numpy(), {}


def _plots(
    model: VideoModel,
    out: Path,
    metrics: Mapping[str, Any],
    betas: Mapping[str, np.ndarray],
    data: NodeTensors | None,
    rows_test: np.ndarray,
    all_ids: list[str],
    class_names: list[str],
) -> list[str]:
    written = [
        plots.plot_history(metrics["history"], out / "training_curves.png"),
        plots.plot_confusion(metrics["confusion_matrix"], class_names, out / "confusion.png"),
    ]
    if betas:
        written.append(plots.plot_beta_pyramid(betas, out / "beta_pyramid.png"))
    if isinstance(model, TwoStream) and data is not None and len(rows_test):
        datp = {s: model.stream_head(s) for s in model.streams}
        datp_heads = {s: h for s, h in datp.items() if isinstance(h, AdaptiveTemporalPooling)}
        if datp_heads:
            rows = rows_test[:6]
            model.eval()
            with torch.no_grad():
                nodes = data.take(torch.as_tensor(rows), torch.float32)
                weights = {s: h.temporal_weights(nodes[s]).numpy() for s, h in datp_heads.items()}
            times = next(iter(datp_heads.values())).segment_times()
            written.append(
                plots.plot_datp_weights(
                    times.numpy(), weights, [all_ids[i] for i in rows], out / "datp_weights.png"
                )
            )
    return [p.name for p in written]


def retrain(
    run_dir: str | Path, out_dir: str | Path, *, store_path: str | Path | None = None
) -> dict[str, Any]:
    """Train again from a run's ``config.json`` (same head, streams, splits, options and seed)
    into ``out_dir``; ``store_path`` overrides the recorded store location."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in run directory {str(run_dir)!r}")
    config = json.loads(path.read_text())
    return train_run(store_path or config["store"], out_dir, **config["train_args"])
