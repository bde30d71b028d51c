"""Train a pooling head on cached features and write a run directory.

The backbone is not in the loop: node-only heads read the store's node cache once into memory
(``[n, M, d]`` per stream) and every step is a few large matmuls over it. A run goes through five
steps, one function each:

1. data (:func:`prepare_data`): the splits, a stratified seeded validation part of the training
   split, the summaries in memory, and the standardisation statistics of the training videos;
2. selection (:func:`select`): the grid of learning rates and weight decays trained together on
   the rest of the training split and scored on the validation part;
3. final training (:func:`final_training`): the chosen values refit on the whole training split
   (or the chosen configuration kept, without refit);
4. test (:func:`test`): the test split evaluated once, with the final weights, beside the
   linear-probe references; it never steers a choice;
5. write (:func:`write_run`): ``config.json``, ``model.pt``, ``metrics.json`` and the plots.

See :mod:`aggregator.train_config` for the options and their defaults, and
:mod:`aggregator.rundir` for the directory's files.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator import plots
from aggregator.data import (
    NodeTensors,
    frame_loader,
    load_node_data,
    load_node_tensors,
    open_store,
)
from aggregator.heads import (
    AdaptiveTemporalPooling,
    TemporalPyramid,
    TwoStream,
    VideoModel,
    build_model,
)
from aggregator.heads.standardize import MIN_STD, RunningMoments
from aggregator.intervals import Intervals
from aggregator.metrics import beta_by_level, chance_warnings, classification_metrics
from aggregator.node_cache import NodeBlocks
from aggregator.probe import MAX_FLOATS
from aggregator.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    LabelledSplits,
    further_folds,
    labelled_splits,
    make_run_config,
    read_config,
    save_torch,
    write_json,
)
from aggregator.train_config import Budget, TrainConfig, plan_budget
from aggregator.train_loop import (
    Batch,
    Trial,
    choose,
    endless_batches,
    fit_epoch,
    make_optimizer,
    param_groups,
    train_trials,
    validation_score,
    validation_spread,
    warmup_cosine,
)
from storage import FeatureStore

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "TrainConfig",
    "fit_epoch",
    "param_groups",
    "retrain",
    "train_run",
    "write_json",
]


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


# ---------------------------------------------------------------------------------- model views
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


@torch.no_grad()
def predict_nodes(
    model: VideoModel,
    data: NodeTensors | NodeBlocks,
    index: np.ndarray,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    per_stream: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Outputs ``[n, C]`` of the rows ``index`` (and each stream's own logits when asked).
    Streamed data is read in store order (each cache block once), the outputs put back."""
    model.eval()
    out: list[torch.Tensor] = []
    streams_out: dict[str, list[torch.Tensor]] = {}
    order = data.store_order(index) if isinstance(data, NodeBlocks) else None
    rows = np.asarray(index) if order is None else np.asarray(index)[order]
    for nodes, _, _ in data.batches(rows, batch_size, dtype=dtype, device=device):
        out.append(model.forward_nodes(nodes).float().cpu())
        if per_stream and isinstance(model, TwoStream):
            for s, v in model.stream_logits(nodes).items():
                streams_out.setdefault(s, []).append(v.float().cpu())
    c = model.out_features
    logits = torch.cat(out).numpy() if out else np.zeros((0, c), dtype=np.float32)
    per = {s: torch.cat(v).numpy() for s, v in streams_out.items()}
    if order is not None:
        logits, per = _unsort(logits, order), {s: _unsort(v, order) for s, v in per.items()}
    return logits, per


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows computed in the order ``order`` put back in the original order."""
    out = np.empty_like(values)
    out[order] = values
    return out


@torch.no_grad()
def predict_frames(
    model: VideoModel, store: FeatureStore, video_ids: list[str], device: torch.device
) -> np.ndarray:
    """Outputs ``[n, C]`` of videos read as padded frames."""
    model.eval()
    streams = list(model.input_specs)
    out = []
    for batch in frame_loader(store, video_ids, streams, batch_size=32):
        feats = {s: t.to(device) for s, t in batch.features.items()}
        out.append(model(feats, batch.lengths.to(device)).float().cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------- 1. data
@dataclass
class RunData:
    """The videos of a run in memory order: fit rows, then validation rows (each in a seeded
    random order, so that windows of rows are random batches), then test rows."""

    store: FeatureStore
    class_names: list[str]
    in_features: dict[str, int]
    train_ids: list[str]
    video_ids: list[str]
    labels: np.ndarray
    n_fit: int
    n_val: int
    n_test: int
    splits: LabelledSplits
    nodes: NodeTensors | NodeBlocks | None  # None: frames through a DataLoader
    node_dtype: torch.dtype | None
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows_fit(self) -> np.ndarray:
        return np.arange(self.n_fit)

    @property
    def rows_val(self) -> np.ndarray:
        return np.arange(self.n_fit, self.n_fit + self.n_val)

    @property
    def rows_train(self) -> np.ndarray:
        return np.arange(self.n_fit + self.n_val)

    @property
    def rows_test(self) -> np.ndarray:
        return np.arange(self.n_fit + self.n_val, len(self.video_ids))


def build(config: TrainConfig, in_features: Mapping[str, int], n_classes: int) -> VideoModel:
    """The untrained model of ``config``."""
    return build_model(
        config.head,
        in_features=in_features,
        num_classes=n_classes,
        head_kwargs=config.head_kwargs,
        fusion=config.resolved_fusion,
        fusion_weights=config.fusion_weights,
        standardize=config.standardize,
    )


def standardization_stats(
    nodes: NodeTensors | NodeBlocks, rows: np.ndarray, chunk: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per stream, the mean and standard deviation ``[d]`` of every feature over the summaries
    of ``rows`` (all their nodes or leaves), accumulated in float64 chunk by chunk (in memory or
    streamed from the out-of-core node cache alike)."""
    if len(rows) == 0:
        raise ValueError("no training video to compute standardisation statistics from")
    rows = np.asarray(rows)
    if isinstance(nodes, NodeBlocks):  # order-free: in store order, each cache block read once
        rows = rows[nodes.store_order(rows)]
    moments = RunningMoments()
    for batch, _, _ in nodes.batches(rows, chunk, dtype=torch.float32):
        for s, v in batch.items():
            moments.add(s, v)
    return moments.result()


def prepare_data(
    store: FeatureStore,
    config: TrainConfig,
    specs: Mapping[str, Intervals],
    leaves: list[str],
    *,
    progress: bool = False,
) -> RunData:
    """Step 1: splits, validation part, summaries in memory, standardisation statistics."""
    t0 = time.perf_counter()
    splits = labelled_splits(
        store,
        config.train_split,
        config.test_split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        streams=config.streams,
        val_groups=config.val_groups,
    )
    rng = np.random.default_rng(config.seed)
    fit_idx = splits.fit_idx[rng.permutation(len(splits.fit_idx))]
    val_idx = splits.val_idx[rng.permutation(len(splits.val_idx))]
    splits = replace(splits, fit_idx=fit_idx, val_idx=val_idx)  # rows in this seeded order
    class_names, train_ids, test_ids = splits.class_names, splits.train_ids, splits.test_ids
    y_train, y_test = splits.y_train, splits.y_test
    ids = [train_ids[i] for i in fit_idx] + [train_ids[i] for i in val_idx] + list(test_ids)
    labels = np.concatenate([y_train[fit_idx], y_train[val_idx], y_test]).astype(np.int64)
    in_features = {s: int(store.read(train_ids[0], s).shape[1]) for s in config.streams}
    n_train = len(fit_idx) + len(val_idx)

    data: NodeTensors | NodeBlocks | None = None
    hold: torch.dtype | None = None
    bf16 = config.precision == "bf16"
    if config.inputs == "nodes":
        counts = {
            s: (1 << (len(specs[s].parts) - 1)) if s in leaves else specs[s].count
            for s in config.streams
        }
        n_bytes = 4 * len(ids) * sum(counts[s] * in_features[s] for s in config.streams)
        # bf16 keeps the cache's float16 (batches converted as they go); fp32 while it fits
        hold = torch.float32 if not bf16 and n_bytes <= fp32_budget() else torch.float16
        data = load_node_data(
            store, ids, labels, specs, dtype=hold, leaves=leaves, progress=progress
        )
        stats_source: NodeTensors | NodeBlocks = data
        stats_rows = np.arange(n_train)
    else:  # the statistics still come from the summaries the head reads, as on the nodes path
        stats_source = load_node_tensors(
            store, ids[:n_train], labels[:n_train], specs, leaves=leaves, progress=progress
        )
        stats_rows = np.arange(n_train)
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    if config.standardize:
        # selection models see statistics of the videos they fit; the refit those of all
        stats["fit"] = standardization_stats(stats_source, stats_rows[: len(fit_idx)])
        stats["train"] = standardization_stats(stats_source, stats_rows)
    return RunData(
        store=store,
        class_names=class_names,
        in_features=in_features,
        train_ids=train_ids,
        video_ids=ids,
        labels=labels,
        n_fit=len(fit_idx),
        n_val=len(val_idx),
        n_test=len(test_ids),
        splits=splits,
        nodes=data,
        node_dtype=hold,
        stats=stats,
        seconds=time.perf_counter() - t0,
    )


def refuse_degenerate(config: TrainConfig, data: RunData) -> None:
    """A clear error, before any training, for inputs a head cannot learn from: a stream
    whose every feature is constant over the training videos, and ``stcb`` on streams that
    are all one-dimensional (the compact bilinear feature of scalars is a single product, and
    the signed square root and L2 normalisation that follow leave only its sign)."""
    for s, (_, std) in data.stats.get("train", {}).items():
        if float(std.max()) <= MIN_STD:
            raise ValueError(
                f"stream {s!r} is constant over the {data.n_fit + data.n_val} training videos "
                f"(standard deviation <= {MIN_STD:g} in all {data.in_features[s]} features): "
                "no head can learn from it"
            )
    if config.head == "stcb" and all(d == 1 for d in data.in_features.values()):
        raise ValueError(
            f"head 'stcb' on one-dimensional streams {sorted(data.in_features)}: their compact "
            "bilinear feature is one product whose L2 normalisation leaves only its sign; "
            "use gap, tpp or tp on one-dimensional inputs"
        )


SMALL_FEATURES = 64
REFIT_DROP = 0.2  # training top-1 a healthy refit cannot lose against the selected weights


def resolve_dropout(
    config: TrainConfig, in_features: Mapping[str, int], n_classes: int
) -> TrainConfig:
    """No dropout where a head's classifier sees fewer than :data:`SMALL_FEATURES` features and
    the user did not set one: dropping half of a dozen features removes much of what the
    classifier has (measured on 12-d sequences: 93.8% vs 95.7% without), while on thousands of
    features it is the regulariser the papers use. The result is recorded in ``head_kwargs``."""
    if "dropout" in config.head_kwargs:
        return config
    model = build(config, in_features, n_classes)
    if not isinstance(model, TwoStream):
        return config
    dims = [model.stream_head(s).feature_dim for s in model.streams]
    if min(dims) >= SMALL_FEATURES:
        return config
    log.info("classifier on %d features: no dropout", min(dims))
    return config.replace(head_kwargs={**config.head_kwargs, "dropout": 0.0})


def resolve_batch_norm(config: TrainConfig) -> TrainConfig:
    """No batch norm in the ``gap`` head on standardised inputs unless the user set it: the
    global means are then already standardised with training-split statistics, and the head is
    the global-mean probe's model, a multinomial logistic regression, whose loss is convex
    without batch norm and noisy with it (its statistics come from each batch of a dozen
    videos). The ``max`` head keeps it: without, it lost more on some datasets than it gained on
    others (figures in ``benchmarks/README.md``). The result is recorded in ``head_kwargs``."""
    if config.head != "gap" or not config.standardize or "batch_norm" in config.head_kwargs:
        return config
    return config.replace(head_kwargs={**config.head_kwargs, "batch_norm": False})


# ---------------------------------------------------------------------------------- 2./3. training
@dataclass
class Trainer:
    """What the training steps share: the config, the data, device and precision."""

    config: TrainConfig
    data: RunData
    device: torch.device
    bf16: bool
    # per statistics key: the probe start's weights (None: the head cannot take one) and name
    starts: dict[str, tuple[dict[str, torch.Tensor] | None, str | None]] = field(
        default_factory=dict
    )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype batches are handed over in: bfloat16 under bf16 precision, except that
        standardised inputs go in as float32 (16-bit features far from zero would lose their
        differences before the standardisation; the head's matmuls still run in bfloat16)."""
        return torch.bfloat16 if self.bf16 and not self.config.standardize else torch.float32

    def model(self, stats_key: str, start_rows: np.ndarray | None = None) -> VideoModel:
        """A freshly initialised model (same seed, so every configuration starts alike),
        started from its probe fitted on ``start_rows`` where the head can represent one
        (:func:`aggregator.probe_start.start_from_probe`; fitted once per ``stats_key``)."""
        torch.manual_seed(self.config.seed)
        model = build(self.config, self.data.in_features, len(self.data.class_names))
        if isinstance(model, TwoStream) and model.standardizer is not None:
            for s, (mean, std) in self.data.stats[stats_key].items():
                model.standardizer.set_statistics(s, mean, std)
        if start_rows is not None and self.config.probe_start and self.data.nodes is not None:
            if stats_key not in self.starts:
                self.starts[stats_key] = self._probe_start(model, start_rows)
            state, _ = self.starts[stats_key]
            if state is not None:
                model.load_state_dict(state)
        return model.to(self.device)

    def start_name(self, stats_key: str) -> str | None:
        """The probe the models of ``stats_key`` start from (None: a random start)."""
        return self.starts.get(stats_key, (None, None))[1]

    def _probe_start(
        self, model: VideoModel, rows: np.ndarray
    ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        from aggregator.probe_start import model_probe_name, probe_start_size, start_from_probe

        if model_probe_name(model) is None or probe_start_size(model, len(rows)) > MAX_FLOATS:
            return None, None
        assert self.data.nodes is not None
        inputs = self.data.nodes.take(torch.as_tensor(np.asarray(rows)), torch.float32)
        name = start_from_probe(
            model,
            inputs,
            self.data.labels[rows],
            seed=self.config.seed,
            levels=self.config.probe_levels,
        )
        if name is None:
            return None, None
        return copy.deepcopy(model.state_dict()), name

    def trial(
        self,
        values: Mapping[str, float],
        steps: int,
        stats_key: str,
        start_rows: np.ndarray | None = None,
    ) -> Trial:
        c = self.config
        model = self.model(stats_key, start_rows)
        opt = make_optimizer(
            model,
            optimizer=c.optimizer,
            lr=values["lr"],
            weight_decay=values["weight_decay"],
            momentum=c.momentum,
            simplex_lr_scale=c.simplex_lr_scale,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, c.warmup, c.schedule))
        return Trial(values=dict(values), model=model, opt=opt, sched=sched)

    def batches(self, rows: np.ndarray, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless training batches over ``rows`` (windows where they are contiguous)."""
        gen = torch.Generator().manual_seed(seed)
        data = self.data
        if data.nodes is not None:
            nodes = data.nodes
            rows = np.asarray(rows)
            contiguous = len(rows) == 0 or bool(
                np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
            )

            def epoch() -> Iterator[Batch]:
                for x, y, _ in nodes.batches(
                    rows,
                    batch_size,
                    windows=contiguous,
                    shuffle=not contiguous,
                    generator=gen,
                    dtype=self.compute_dtype,
                    device=self.device,
                ):
                    yield x, y

            return endless_batches(epoch)
        loader = frame_loader(
            data.store,
            [data.video_ids[i] for i in rows],
            list(self.config.streams),
            data.labels[rows],
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
        )
        return endless_batches(lambda: (((b.features, b.lengths), b.labels) for b in loader))

    def outputs(
        self, model: VideoModel, rows: np.ndarray, per_stream: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """float32 outputs of ``rows``, as a loaded run computes them."""
        if self.data.nodes is not None:
            return predict_nodes(
                model, self.data.nodes, rows, device=self.device, per_stream=per_stream
            )
        ids = [self.data.video_ids[i] for i in rows]
        return predict_frames(model, self.data.store, ids, self.device), {}

    def validator(
        self, rows: np.ndarray | None = None
    ) -> Callable[[VideoModel], tuple[float, ...]]:
        rows = self.data.rows_val if rows is None else rows
        labels = self.data.labels[rows]
        return lambda model: validation_spread(self.outputs(model, rows)[0], labels)


@dataclass
class Fold:
    """One split of the training videos for the selection: fit on ``fit``, score on ``val``."""

    fit: np.ndarray
    val: np.ndarray
    stats_key: str


def selection_folds(data: RunData, config: TrainConfig) -> list[Fold]:
    """The validation part as fold 0 and, while the pooled validation videos are fewer than
    ``config.min_validation``, further folds up to ``config.max_folds`` folds
    (:func:`aggregator.rundir.further_folds`): when validation holds out groups, the next folds
    of whole groups (:func:`aggregator.data.grouped_holdout`); else folds of the same size per
    class taken in turn from the fit rows. Every fold's standardisation statistics come from its
    own fit rows only."""
    folds = [Fold(data.rows_fit, data.rows_val, "fit")]
    if data.n_val == 0 or data.nodes is None:
        return folds
    splits = data.splits
    group_folds = None
    if splits.group_by is not None:
        row_of = np.empty(len(splits.train_ids), dtype=np.int64)
        row_of[splits.fit_idx] = np.arange(data.n_fit)
        row_of[splits.val_idx] = data.n_fit + np.arange(data.n_val)
        group_folds = [row_of[part] for part in splits.more_folds]
    more = further_folds(
        data.labels,
        data.rows_fit,
        data.rows_val,
        group_folds,
        min_validation=config.min_validation,
        max_folds=config.max_folds,
        seed=config.seed,
    )
    return folds + [_fold(data, config, k, val) for k, val in enumerate(more, start=1)]


def _fold(data: RunData, config: TrainConfig, k: int, val: np.ndarray) -> Fold:
    """Fold ``k``: validate on the rows ``val``, fit on the other training rows, standardised
    with statistics of those fit rows only."""
    val = np.sort(val)
    fit = np.setdiff1d(data.rows_train, val)
    key = f"fold{k}"
    if config.standardize and key not in data.stats:
        assert data.nodes is not None
        data.stats[key] = standardization_stats(data.nodes, fit)
    return Fold(fit, val, key)


@dataclass
class Selection:
    trials: list[Trial]
    chosen: dict[str, float]
    chosen_trial: Trial | None
    seconds: float
    folds: list[list[Trial]] = field(default_factory=list)  # further folds' trials, grid order
    scores: list[tuple[float, float]] = field(default_factory=list)  # pooled (top1, -loss)
    fold_sizes: list[int] = field(default_factory=list)
    best_steps: list[int] = field(default_factory=list)  # pooled best pass, per grid point
    select_steps: int = 0
    errors: list[float] = field(default_factory=list)  # standard error of each pooled loss
    start: dict[str, Any] | None = None  # the probe start's pooled validation scores
    keep_start: bool = False  # the probe start validated at least as well as the trained head

    def head_scores(self) -> tuple[float, float] | None:
        """The chosen configuration's validation ``(top1, loss)``, pooled over the folds."""
        t = self.chosen_trial
        if t is None or t.best_state is None:
            return None
        if self.scores:
            top1, neg_loss = self.scores[self.trials.index(t)]
            return top1, -neg_loss
        return t.best[0], -t.best[1]

    def against_start(self) -> Selection:
        """Keep the probe start unless the chosen trained configuration validates better on
        the pooled folds on both counts: more videos right and a loss lower by more than its
        standard error (:func:`aggregator.probe_start.trained_head_wins`). Top-1 alone
        cannot see a head whose confident mistakes cost many times the probe's loss (a linear
        head trained at too large a learning rate keeps its argmax and loses its scale), and
        the trained head's scores are the best of a grid and of its validation passes, so on
        a draw the start is the more honest guess."""
        from aggregator.probe_start import pass_loss_error, trained_head_wins

        head, t = self.head_scores(), self.chosen_trial
        if self.start is not None and head is not None and t is not None:
            se = (
                self.errors[self.trials.index(t)]
                if self.errors
                else pass_loss_error(t.history, t.best_step, self.start["videos"])
            )
            self.start["head_val_top1"], self.start["head_val_loss"] = head
            self.start["head_val_loss_se"] = se
            self.keep_start = not trained_head_wins(self.start, head[0], head[1], se)
            self.start["kept"] = "probe start" if self.keep_start else "trained head"
            log.info(
                "%s probe start %.4f against the trained head %.4f on %d validation videos: "
                "keeping the %s",
                self.start["probe"],
                self.start["val_top1"],
                head[0],
                self.start["videos"],
                self.start["kept"],
            )
        return self

    @property
    def peak_fraction(self) -> float:
        """Where in its schedule the chosen configuration's validation peaked (1: at its end
        or nothing chosen), from the pooled best pass when there are folds. Reported, not acted
        on: a refit cut to that share of the budget scored 27.9% on PLAID against 28.5% for the
        whole budget (gap, seeds 0-2), the peak of one validation part being a noisy guide."""
        t = self.chosen_trial
        if t is None or self.select_steps <= 0:
            return 1.0
        step = self.best_steps[self.trials.index(t)] if self.best_steps else t.best_step
        return min(1.0, max(step, 1) / self.select_steps)

    def grid_summary(self) -> list[dict[str, Any]]:
        """Every grid point with its validation scores (pooled over the folds when there are
        several, each fold's own top-1 beside them)."""
        out = []
        for i, t in enumerate(self.trials):
            row = t.summary()
            if self.folds:
                top1, neg_loss = self.scores[i]
                row["val_top1"], row["val_loss"] = top1, -neg_loss
                if self.errors:
                    row["val_loss_se"] = self.errors[i]
                row["fold_val_top1"] = [t.best[0]] + [f[i].best[0] for f in self.folds]
            out.append(row)
        return out


def pooled_scores(
    per_fold: list[list[Trial]], sizes: list[int]
) -> tuple[list[tuple[float, float]], list[int], list[float]]:
    """Per grid point, ``(top1, -loss)`` of all validation videos together (every fold's scores
    weighted by its video count) at the validation pass where their pooled loss is lowest, the
    step of that pass, and the standard error of that pooled loss (NaN when unknown).

    One pass for all folds, not each fold's own best: the best of twenty passes over three
    videos is mostly luck, and it favours configurations whose predictions flicker. A trial
    stopped early keeps its last scores for the passes it did not run.
    """
    total = float(sum(sizes))
    out, steps, errors = [], [], []
    for i in range(len(per_fold[0])):
        curves = []
        for fold, n in zip(per_fold, sizes, strict=True):
            passes = [h for h in fold[i].history if "val_loss" in h]
            scored = [
                (h["val_top1"], h["val_loss"], h.get("val_loss_sq", math.nan), h["step"])
                for h in passes
            ]
            curves.append((n, scored))
        length = max(len(c) for _, c in curves)
        longest = max((c for _, c in curves), key=len)
        best = (-math.inf, -math.inf, 0, math.nan)
        for e in range(length):
            top1, loss, sq = (
                sum(n * c[min(e, len(c) - 1)][k] for n, c in curves) / total for k in range(3)
            )
            if not math.isfinite(loss):
                loss = math.inf
            if (-loss, top1) > best[:2]:
                se = math.sqrt(max(0.0, sq - loss * loss) / total)
                best = (-loss, top1, int(longest[e][3]), se)
        out.append((best[1], best[0]))
        steps.append(best[2])
        errors.append(best[3])
    return out, steps, errors


def one_standard_error(
    grid: Sequence[Mapping[str, float]], scores: Sequence[tuple[float, float]], errors: list[float]
) -> int:
    """The grid point to choose on a few pooled validation videos: among the points whose
    pooled loss is within one standard error of the lowest, the most conservative one (the
    smallest learning rate, then the largest weight decay); the "one-standard-error rule" of
    cross-validation. On a few dozen videos the lowest loss is as much the luck of those videos
    as a property of the configuration: on 42 videos of three held-out subjects, the lowest loss
    (lr 1e-2, 0.92) and lr 1e-3 (0.98, standard error about 0.15) were a draw, and the larger
    rate, refit, scored 64-69% on new subjects against 83% for the smaller."""
    best = max(range(len(grid)), key=lambda j: (scores[j][1], scores[j][0]))  # first wins ties
    if not math.isfinite(errors[best]):
        return best
    bound = -scores[best][1] + errors[best]
    near = [j for j in range(len(grid)) if -scores[j][1] <= bound]
    return min(near, key=lambda j: (grid[j]["lr"], -grid[j]["weight_decay"], j))


def select(trainer: Trainer, budget: Budget) -> Selection:
    """Step 2: train the grid on the fit rows, score it on the validation rows, choose.

    Without validation videos nothing can be chosen: the grid's middle is taken. With a single
    configuration and refit there is nothing to choose either, and no selection is trained.
    A small validation part gets further folds (:func:`selection_folds`); the choice is then made
    on the scores pooled over them, and fold 0's trial stands for the chosen values.
    """
    c, data = trainer.config, trainer.data
    grid = c.grid()
    if data.n_val == 0 or (len(grid) == 1 and c.refit):
        if data.n_val == 0 and len(grid) > 1:
            log.warning("no validation video: taking %s without selection", c.default_point())
        return Selection([], c.default_point() if len(grid) > 1 else grid[0], None, 0.0)
    steps = budget.select_steps
    folds = selection_folds(data, c)
    per_fold: list[list[Trial]] = []
    seconds = 0.0
    start_scores: list[tuple[float, float, int]] = []  # per fold: (top1, loss, videos)
    for fold in folds:
        trials = [trainer.trial(v, steps, fold.stats_key, fold.fit) for v in grid]
        if trainer.start_name(fold.stats_key) is not None:
            top1, loss = trainer.validator(fold.val)(trials[0].model)[:2]
            start_scores.append((top1, loss, len(fold.val)))
        seconds += train_trials(
            trials,
            trainer.batches(fold.fit, budget.batch_size, c.seed),
            steps=steps,
            device=trainer.device,
            grad_clip=c.grad_clip,
            bf16=trainer.bf16,
            validate=trainer.validator(fold.val),
            eval_every=budget.eval_every(steps),
            patience=c.patience,
            epoch_steps=max(1, math.ceil(len(fold.fit) / budget.batch_size)),
        )
        per_fold.append(trials)
    trials = per_fold[0]
    start = _pooled_start(trainer, folds, start_scores)
    if len(folds) == 1:
        best = choose(trials)
        log.info("chose %s (validation top-1 %.4f)", best.values, best.best[0])
        return Selection(
            trials, dict(best.values), best, seconds, select_steps=steps, start=start
        ).against_start()
    sizes = [len(f.val) for f in folds]
    scores, best_steps, errors = pooled_scores(per_fold, sizes)
    # the pooled loss decides (top-1 on a few dozen videos moves in steps of several points)
    i = one_standard_error(grid, scores, errors)
    log.info(
        "chose %s (loss %.4f +- %.4f, top-1 %.4f on %d validation videos in %d folds)",
        grid[i],
        -scores[i][1],
        errors[i],
        scores[i][0],
        sum(sizes),
        len(folds),
    )
    return Selection(
        trials,
        dict(grid[i]),
        trials[i],
        seconds,
        per_fold[1:],
        scores,
        sizes,
        best_steps,
        steps,
        errors,
        start,
    ).against_start()


def _pooled_start(
    trainer: Trainer, folds: Sequence[Fold], scores: list[tuple[float, float, int]]
) -> dict[str, Any] | None:
    """The probe start's validation top-1 and loss pooled over the folds (None: no start)."""
    if len(scores) != len(folds) or not scores:
        return None
    n = sum(v for _, _, v in scores)
    return {
        "probe": trainer.start_name(folds[0].stats_key),
        "val_top1": sum(t * v for t, _, v in scores) / n,
        "val_loss": sum(loss * v for _, loss, v in scores) / n,
        "videos": n,
    }


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
    if config.head == "stpn":  # reads the spatial map streams, through its own loader
        from aggregator.maps.train import train_map_run

        return train_map_run(
            store_path,
            out_dir,
            head_kwargs=config.head_kwargs,
            train_split=config.train_split,
            test_split=config.test_split,
            val_fraction=config.val_fraction,
            val_groups=config.val_groups,
            epochs=config.epochs if config.epochs is not None else 30,
            batch_size=config.batch_size if config.batch_size is not None else 32,
            lr=config.lr,
            weight_decay=config.weight_decay if config.weight_decay is not None else 1e-4,
            patience=config.patience,
            grad_clip=config.grad_clip,
            seed=config.seed,
            device=config.device,
            threads=config.threads,
            make_plots=make_plots,
        )
    from aggregator.heads import HEADS

    if config.head not in HEADS:
        raise ValueError(f"unknown head {config.head!r}; known: {sorted(HEADS)}")
    dev = resolve_device(config.device)
    precision = resolve_precision(config.precision, dev)
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        seed_everything(config.seed)
        store = open_store(str(store_path))
        return _train(store, Path(out_dir), config, dev, precision, make_plots, progress, t_start)
    finally:
        torch.set_num_threads(old_threads)


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
    chosen = selection.chosen_trial
    metrics.update(
        run_id=config_json["run_id"],
        head=config.head,
        streams=list(config.streams),
        n_train=final.n_train,
        n_val=data.n_val,
        n_test=data.n_test,
        precision=precision,
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
    check, warnings = probe_check(trainer, selection)
    warnings += chance_warnings(metrics, len(data.class_names))
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


def retrain(
    run_dir: str | Path, out_dir: str | Path, *, store_path: str | Path | None = None
) -> dict[str, Any]:
    """Train again from a run's ``config.json`` (same head, streams, splits, options and seed)
    into ``out_dir``; ``store_path`` overrides the recorded store location."""
    config = read_config(run_dir)
    train_config = TrainConfig.from_dict(config["train_args"])
    return train_run(store_path or config["store"], out_dir, train_config)
