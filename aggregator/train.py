"""Train a pooling head on cached features and write a run directory.

The backbone is not in the loop: node-only heads read the store's node cache once into memory
(``[n, M, d]`` per stream) and every step is a few large matmuls over it. A run goes through five
steps, one function each:

1. data (:func:`aggregator.run_data.prepare_data`): the splits, a stratified seeded validation
   part of the training split, the summaries in memory, and the standardisation statistics of
   the training videos;
2. selection (:func:`aggregator.selection.select`): the grid of learning rates and weight decays
   trained together on the rest of the training split and scored on the validation part;
3. final training (:func:`final_training`): the chosen values refit on the whole training split
   (or the chosen configuration kept, without refit);
4. test (:func:`test`): the test split evaluated once, with the final weights, beside the
   linear-probe references; it never steers a choice;
5. write (:func:`write_run`): ``config.json``, ``model.pt``, ``metrics.json`` and the plots.

The steps share a :class:`aggregator.trainer.Trainer`. See :mod:`aggregator.train_config` for
the options and their defaults, :mod:`aggregator.rundir` for the directory's files, and
:func:`aggregator.trainers.train` for the one entry of every trainer (this one, the map heads',
the SVM's).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator import plots
from aggregator.data import open_store
from aggregator.degenerate import input_warnings, refuse_inputs
from aggregator.heads import AdaptiveTemporalPooling, TwoStream, VideoModel
from aggregator.heads.views import (
    fusion_weights_of,
    model_beta_matrices,
    model_betas,
    pyramid_leaf_streams,
)
from aggregator.intervals import Intervals
from aggregator.metrics import beta_by_level, chance_warnings, classification_metrics
from aggregator.probe import MAX_FLOATS
from aggregator.run_data import RunData, prepare_data, standardization_stats
from aggregator.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    make_run_config,
    save_torch,
    write_json,
)
from aggregator.selection import Selection, select, selection_folds
from aggregator.streams import MAP_HEADS
from aggregator.train_config import Budget, TrainConfig, plan_budget
from aggregator.train_loop import train_trials, validation_score
from aggregator.trainer import Trainer, build, resolve_batch_norm, resolve_dropout
from extractor.runtime import resolve_device, resolve_precision, seeded_run
from storage import FeatureStore

log = logging.getLogger(__name__)

__all__ = [
    "final_training",
    "probe_check",
    "refuse_degenerate",
    "run_config",
    "test",
    "train_run",
    "write_run",
]


def refuse_degenerate(config: TrainConfig, data: RunData) -> None:
    """A clear error, before any training, for inputs a head cannot learn from
    (:func:`aggregator.degenerate.refuse_inputs`: constant streams, ``stcb`` on scalars)."""
    stats = data.stats.get("train")
    if stats is None and data.nodes is not None:  # not standardised: the statistics still tell
        stats = standardization_stats(data.nodes, data.rows_train)
    refuse_inputs(config.head, data.in_features, stats or {}, data.n_fit + data.n_val)


REFIT_DROP = 0.2  # training top-1 a healthy refit cannot lose against the selected weights


@dataclass
class Final:
    model: VideoModel
    history: list[dict[str, Any]]
    n_train: int
    steps: int
    refit: bool
    seconds: float


def final_training(trainer: Trainer, budget: Budget, selection: Selection) -> Final:
    """Step 3: the chosen values trained on the whole training split (refit), or the chosen
    configuration's best validation weights (no refit)."""
    c, data = trainer.config, trainer.data
    if selection.keep_start:  # the probe's solution, fitted on the videos the refit would see
        key, rows = ("train", data.rows_train) if c.refit else ("fit", data.rows_fit)
        return Final(trainer.model(key, rows), [], len(rows), 0, c.refit, 0.0)
    if selection.chosen_trial is not None and not c.refit:
        t = selection.chosen_trial
        assert t.best_state is not None
        t.model.load_state_dict(t.best_state)
        return Final(t.model, t.history, data.n_fit, t.steps_run, False, 0.0)
    rows = data.rows_train if c.refit or data.n_val == 0 else data.rows_fit
    steps = budget.steps if c.refit else budget.select_steps
    trial = trainer.trial(selection.chosen, steps, "train" if c.refit else "fit", rows)
    validate = None if c.refit or data.n_val == 0 else trainer.validator()
    seconds = train_trials(
        [trial],
        trainer.batches(rows, budget.batch_size, c.seed + 1),
        steps=steps,
        device=trainer.device,
        grad_clip=c.grad_clip,
        bf16=trainer.bf16,
        validate=validate,
        eval_every=budget.eval_every(steps),
        patience=c.patience if validate is not None else None,
        epoch_steps=max(1, math.ceil(len(rows) / budget.batch_size)),
    )
    if trial.best_state is not None:
        trial.model.load_state_dict(trial.best_state)
    chosen = selection.chosen_trial
    if c.refit and chosen is not None and chosen.best_state is not None:
        # the refit has no held-out videos to watch. If it scores the training videos (all of
        # which it has seen) far below the chosen configuration's weights (which saw all but
        # the validation part), or its outputs no longer tell the classes apart, it has
        # diverged or collapsed (a learning rate that held for the selection's shorter schedule
        # can fail over the full one): keep the chosen configuration's weights instead. Scored
        # on the whole training split, not on the validation part alone: on three validation
        # videos one video is a drop of a third, which noise alone produces.
        rows_all = data.rows_train
        outputs, _ = trainer.outputs(trial.model, rows_all)
        seen_top1, _ = validation_score(outputs, data.labels[rows_all])
        chosen.model.load_state_dict(chosen.best_state)
        chosen_outputs, _ = trainer.outputs(chosen.model, rows_all)
        chosen_top1, _ = validation_score(chosen_outputs, data.labels[rows_all])
        collapsed = not np.isfinite(outputs).all() or bool(np.ptp(outputs, axis=1).max() < 1e-6)
        if collapsed or seen_top1 < chosen_top1 - REFIT_DROP:
            log.warning(
                "the refit scores %.4f on the training videos (the selected weights: %.4f)%s: "
                "keeping the selected weights",
                seen_top1,
                chosen_top1,
                ", every class alike" if collapsed else "",
            )
            chosen.model.load_state_dict(chosen.best_state)
            return Final(chosen.model, chosen.history, data.n_fit, chosen.steps_run, False, seconds)
    return Final(trial.model, trial.history, len(rows), trial.steps_run, c.refit, seconds)


# ---------------------------------------------------------------------------------- probes
def probe_check(trainer: Trainer, selection: Selection) -> tuple[dict[str, Any] | None, list[str]]:
    """The head against its probes on the selection's validation folds, and the warnings.

    A head started from its probe records the start's and the trained head's pooled scores
    and which one was kept (:meth:`Selection.against_start`). Any other head (or a run whose
    start was skipped) is compared with the global-mean and node-mean probes fitted on every
    fold's fit videos (:func:`aggregator.probe_start.fold_probe_scores`); a warning says when a
    probe validates better."""
    from aggregator.probe_start import ProbeScores, fold_probe_scores, probe_verdict

    if selection.start is not None:
        return dict(selection.start), []
    data, c = trainer.data, trainer.config
    head = selection.head_scores()
    if head is None or data.n_val == 0 or not c.probe:
        return None, []
    folds = selection_folds(data, c)
    n_train = data.n_fit + data.n_val
    ids = data.video_ids[:n_train]
    spec = Intervals.pyramid(c.probe_levels)
    width = sum(data.in_features.values())
    if n_train * spec.count * width > MAX_FLOATS:
        return None, []
    from aggregator.data import load_summaries

    nodes = [load_summaries(data.store, ids, s, spec, progress=False) for s in c.streams]
    probes: dict[str, ProbeScores | None] = {}
    labels = data.labels[:n_train]
    pairs = [(f.fit, f.val) for f in folds]
    for name, count in (("global_mean", 1), ("pyramid_nodes", spec.count)):
        x = np.concatenate([n[:, :count].reshape(n_train, -1) for n in nodes], axis=1)
        probes[name] = fold_probe_scores(x.astype(np.float32), labels, pairs, seed=c.seed)
    record, warning = probe_verdict(head[0], probes)
    record["levels"] = c.probe_levels
    return record, [warning] if warning else []


# ---------------------------------------------------------------------------------- 4. test
def test(trainer: Trainer, model: VideoModel) -> dict[str, Any]:
    """Step 4: test metrics of the final model (and of each stream alone), and the probes."""
    data, c = trainer.data, trainer.config
    rows = data.rows_test
    names = data.class_names
    per_stream: dict[str, Any] = {}
    if len(rows):
        outputs, streams = trainer.outputs(model, rows, per_stream=True)
        metrics = classification_metrics(outputs, data.labels[rows], names)
        for s, lg in streams.items():
            m = classification_metrics(lg, data.labels[rows], names)
            per_stream[s] = {k: m[k] for k in ("top1", "top5", "mean_class_accuracy")}
    else:
        metrics = classification_metrics(np.zeros((0, len(names))), np.zeros(0), names)
    metrics["per_stream"] = per_stream or None
    metrics["probe"] = None
    n_train = data.n_fit + data.n_val
    if c.probe and len(rows) and len(np.unique(data.labels[:n_train])) > 1:
        from aggregator.probe import linear_probes

        metrics["probe"] = linear_probes(
            data.store,
            list(c.streams),
            data.video_ids[:n_train],
            data.labels[:n_train],
            data.video_ids[n_train:],
            data.labels[rows],
            names,
            levels=c.probe_levels,
            seed=c.seed,
        )
    return metrics


# ---------------------------------------------------------------------------------- 5. write
def run_config(
    config: TrainConfig, data: RunData, model: VideoModel, out: Path, precision: str
) -> dict[str, Any]:
    """``config.json``: what rebuilds the model and reruns the training."""
    train_args = config.to_dict()
    train_args["precision"] = precision
    model_fields = {
        "head_kwargs": dict(config.head_kwargs),
        "in_features": data.in_features,
        "num_classes": len(data.class_names),
        "fusion": config.resolved_fusion,
        "fusion_weights": config.fusion_weights,
        "fusion_rule": "probabilities",
        "standardize": isinstance(model, TwoStream) and model.standardizer is not None,
        "streams": list(config.streams),
        "input_specs": {s: spec.to_dict() for s, spec in model.input_specs.items()},
    }
    extractor = {s: data.store.extractor.get(s) for s in config.streams}
    return make_run_config(
        out,
        data.store,
        config.head,
        model_fields,
        extractor=extractor,
        splits=data.splits,
        train_args=train_args,
    )


def write_run(
    out: Path,
    config_json: Mapping[str, Any],
    model: VideoModel,
    metrics: dict[str, Any],
    *,
    make_plots: bool,
    trainer: Trainer,
) -> dict[str, Any]:
    """Step 5: the run directory's files (metrics last, so a complete metrics.json means a
    complete run)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, config_json)
    model.cpu()
    save_torch(model.state_dict(), out / MODEL_FILE)
    if make_plots:
        t0 = time.perf_counter()
        metrics["plots"] = _plots(model, out, metrics, trainer)
        metrics["seconds_plots"] = time.perf_counter() - t0
    return metrics


def _plots(model: VideoModel, out: Path, metrics: Mapping[str, Any], trainer: Trainer) -> list[str]:
    data = trainer.data
    title = f"{out.name} ({metrics['head']})"
    written = [
        plots.plot_history(
            metrics["history"],
            out / "training_curves.png",
            title=title,
            refit=metrics.get("refit_history"),
        ),
        plots.plot_confusion(
            metrics["confusion_matrix"], data.class_names, out / "confusion.png", title=title
        ),
    ]
    betas = model_beta_matrices(model)
    if betas:
        written.append(plots.plot_beta_pyramid(betas, out / "beta_pyramid.png", title=title))
    rows = data.rows_test[:6]
    if isinstance(model, TwoStream) and data.nodes is not None and len(rows):
        datp = {
            s: h
            for s in model.streams
            if isinstance(h := model.stream_head(s), AdaptiveTemporalPooling)
        }
        if datp:
            model.eval()
            with torch.no_grad():
                nodes = model.prepare(data.nodes.take(torch.as_tensor(rows), torch.float32))
                weights = {s: h.temporal_weights(nodes[s]).numpy() for s, h in datp.items()}
            times = next(iter(datp.values())).segment_times()
            ids = [data.video_ids[i] for i in rows]
            written.append(
                plots.plot_datp_weights(
                    times.numpy(), weights, ids, out / "datp_weights.png", title=title
                )
            )
    return [p.name for p in written]


# ---------------------------------------------------------------------------------- the run
def train_run(
    store_path: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    make_plots: bool = True,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Train a head on the store's features, evaluate it on the test split, write ``out_dir``.

    ``config`` holds the options (:class:`TrainConfig`); keyword ``options`` replace its fields
    (``train_run(store, out, head="gap", steps=500)``). Returns the metrics written to
    ``metrics.json``: the test metrics, the linear-probe references (``probe``), the selection
    (every grid point with its validation scores, the chosen one), the final training's budget,
    beta and fusion weights where the head learns them, timings and histories.
    """
    t_start = time.perf_counter()
    config = (config or TrainConfig()).replace(**options) if options else config or TrainConfig()
    from aggregator.heads import HEADS

    if config.head in MAP_HEADS:
        raise ValueError(
            f"head {config.head!r} reads the spatial map streams: train it with "
            "aggregator.trainers.train (its options are aggregator.train_config.MapTrainConfig)"
        )
    if config.head not in HEADS:
        raise ValueError(f"unknown head {config.head!r}; known: {sorted(HEADS)}")
    dev = resolve_device(config.device)
    precision = resolve_precision(config.precision, dev)
    with seeded_run(config.seed, config.threads):
        store = open_store(str(store_path))
        return _train(store, Path(out_dir), config, dev, precision, make_plots, progress, t_start)


def _train(
    store: FeatureStore,
    out: Path,
    config: TrainConfig,
    dev: torch.device,
    precision: str,
    make_plots: bool,
    progress: bool,
    t_start: float,
) -> dict[str, Any]:
    config = config.replace(precision=precision)
    from aggregator.probe_start import resolve_tpp_bins

    config = resolve_tpp_bins(config, store)
    # a throwaway model says what the head reads (input specs, which streams take leaves)
    probe_model = build(config, dict.fromkeys(config.streams, 1), 2)
    leaves = pyramid_leaf_streams(probe_model) if config.pyramid_leaves else []
    data = prepare_data(store, config, probe_model.input_specs, leaves, progress=progress)
    refuse_degenerate(config, data)
    config = resolve_dropout(config, data.in_features, len(data.class_names))
    config = resolve_batch_norm(config)
    trainer = Trainer(config, data, dev, precision == "bf16")
    grid = config.grid()
    budget = plan_budget(config, max(1, data.n_fit), data.n_fit + data.n_val, len(grid))
    selection = select(trainer, budget)
    final = final_training(trainer, budget, selection)
    model = final.model
    config_json = run_config(config, data, model, out, precision)

    metrics = test(trainer, model)
    metrics.update(_run_metrics(trainer, config_json, budget, selection, final))
    check, warnings = probe_check(trainer, selection)
    warnings += chance_warnings(metrics, len(data.class_names))
    warnings += input_warnings(config.head, data.in_features)
    for w in warnings:
        log.warning("%s: %s", config.head, w)
    metrics.update(probe_check=check, warnings=warnings)
    betas = model_beta_matrices(model)
    if any(b.shape[0] > 1 for b in betas.values()):
        metrics["beta_pyramids"] = {s: [beta_by_level(row) for row in b] for s, b in betas.items()}
    metrics = write_run(out, config_json, model, metrics, make_plots=make_plots, trainer=trainer)
    metrics["seconds"] = time.perf_counter() - t_start
    write_json(out / METRICS_FILE, metrics)
    return metrics


def _run_metrics(
    trainer: Trainer,
    config_json: Mapping[str, Any],
    budget: Budget,
    selection: Selection,
    final: Final,
) -> dict[str, Any]:
    """What ``metrics.json`` records of the run beside the test metrics: sizes, the selection,
    the final training, what the model learned, timings and histories."""
    config, data, model = trainer.config, trainer.data, final.model
    chosen = selection.chosen_trial
    return dict(
        run_id=config_json["run_id"],
        head=config.head,
        streams=list(config.streams),
        n_train=final.n_train,
        n_val=data.n_val,
        n_test=data.n_test,
        precision=config.precision,
        node_dtype=str(data.node_dtype).removeprefix("torch.") if data.nodes is not None else None,
        pyramid_leaves=sorted(data.nodes.mix) if data.nodes is not None else [],
        standardize=config_json["standardize"],
        selection={
            "grid": selection.grid_summary(),
            "chosen": selection.chosen,
            "folds": 1 + len(selection.folds) if selection.trials else 0,
            "validation_videos": sum(selection.fold_sizes) or data.n_val,
            "steps_per_configuration": budget.select_steps if selection.trials else 0,
            "seconds": selection.seconds,
        },
        training={
            "refit": final.refit,
            "refit_fallback": chosen is not None and config.refit and not final.refit,
            "steps": final.steps,
            "validation_peak": selection.peak_fraction,
            "batch_size": budget.batch_size,
            "epochs": final.steps * budget.batch_size / max(1, final.n_train),
            "lr": selection.chosen["lr"],
            "weight_decay": selection.chosen["weight_decay"],
            "seconds": final.seconds,
        },
        val_top1=chosen.best[0] if chosen is not None and chosen.best_state is not None else None,
        beta=model_betas(model) or None,
        fusion_weights=fusion_weights_of(model),
        seconds_data=data.seconds,
        seconds_train=selection.seconds + final.seconds,
        history=chosen.history if chosen is not None else final.history,
        refit_history=final.history if chosen is not None and final.refit else None,
    )
