"""What the steps of a deep-head run share (:class:`Trainer`): the config, the data, device and
precision; fresh models (seeded alike, standardised, started from their probe where the head can
represent one), optimisers, batches and outputs. And the model a config builds, with the
dropout and batch norm defaults resolved for the data."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from aggregator.data import frame_loader
from aggregator.heads import TwoStream, VideoModel, build_model
from aggregator.inference import predict_frames, predict_nodes
from aggregator.probe import MAX_FLOATS
from aggregator.run_data import RunData
from aggregator.train_config import TrainConfig
from aggregator.train_loop import (
    Batch,
    Trial,
    endless_batches,
    make_optimizer,
    validation_spread,
    warmup_cosine,
)

log = logging.getLogger(__name__)

__all__ = ["SMALL_FEATURES", "Trainer", "build", "resolve_batch_norm", "resolve_dropout"]

SMALL_FEATURES = 64


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
