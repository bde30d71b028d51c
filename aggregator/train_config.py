"""What a training run is asked to do, and the budget it resolves to.

Every trainer takes one frozen, typed config: :class:`TrainConfig` (the deep heads),
:class:`MapTrainConfig` (the spatial map heads) and the SVM's; they share
:class:`BaseTrainConfig`, which holds the options every trainer has (head, streams, splits,
seed) and the ``to_dict``/``from_dict``/``replace`` round trip through ``config.json``'s
``train_args``.

Defaults that hold from a hundred videos to UCF101's 13,320:

- the budget is in optimiser steps (:data:`DEFAULT_STEPS`, warmup then cosine decay), with a
  batch size that shrinks for small datasets, so that a few hundred videos get hundreds of epochs
  and UCF101 about thirty; ``epochs``, when given, wins;
- learning rate and weight decay are chosen on the validation part from a small grid (3 x 3),
  whose configurations are trained together for ``select_budget`` single configurations in all
  (each for ``select_budget / K`` of the budget), then the chosen values are refit on the whole
  training split for the full budget;
- inputs are standardised with statistics of the training split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from aggregator.streams import MAP_HEADS, MAP_STREAMS
from extractor.runtime import OLD_PRECISIONS, PRECISIONS

DEFAULT_STEPS = 1000
MAX_BATCH = 128
MIN_BATCH = 8
DEFAULT_LR_GRID = {"adam": (1e-3, 1e-2, 1e-1), "sgd": (1e-3, 1e-2, 1e-1)}
DEFAULT_WEIGHT_DECAY_GRID = (1e-4, 1e-3, 1e-2)
EVALUATIONS = 20  # validation passes per training phase
MIN_VALIDATION = 40  # validation videos the selection wants before it adds folds
MAX_FOLDS = 4


@dataclass(frozen=True)
class BaseTrainConfig:
    """The options every trainer shares, and the round trip through ``train_args``.

    A trainer's config subclasses it (``@dataclass(frozen=True)``), gives ``head`` its default,
    lists its tuple-valued fields in ``TUPLE_FIELDS`` (read back from JSON lists) and extends
    :meth:`validate` (calling ``super().validate()``). The fields are checked when the config is
    made, so a config that exists is valid.

    Attributes:
        head: the head's name (a key of :data:`aggregator.heads.HEADS`, or ``svm``).
        streams: stream names, in order, without repeats.
        train_split, test_split: the store's split names (no test split: None).
        val_groups: how the validation part is held out: ``auto`` holds out whole groups when
            every training video has a stored group (a labels CSV's ``group`` column), else a
            stratified random share; ``none`` always the random share; otherwise a regular
            expression on video ids whose first capture group is the group (``_(g[0-9]+)_`` for
            UCF101). See :func:`aggregator.data.video_groups`.
        seed: seeds every random choice of the run (splits, initialisation, batches).
    """

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("streams",)

    head: str = ""
    streams: tuple[str, ...] = ("appearance",)
    train_split: str = "train"
    test_split: str | None = "test"
    val_groups: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", tuple(dict.fromkeys(self.streams)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        if not self.streams:
            raise ValueError("no stream given")
        if not self.val_groups:
            raise ValueError("val_groups must be 'auto', 'none' or a regular expression, got ''")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists): ``config.json``'s ``train_args``."""
        out = dataclasses.asdict(self)
        for name in self.TUPLE_FIELDS:
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """A config from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        kw = dict(values)
        for name in cls.TUPLE_FIELDS:
            if kw.get(name) is not None:
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainConfig(BaseTrainConfig):
    """Every option of a deep-head training run (:class:`BaseTrainConfig`'s and its own).

    Attributes:
        head: a key of :data:`aggregator.heads.HEADS`.
        streams: stream names; several streams are fused (learned weights on probabilities;
            fixed 0.5/0.5 on scores for ``tpp`` as in DTPP unless ``fusion`` says otherwise).
        head_kwargs: the head class's keyword arguments, e.g. ``{"depth": 4}`` for ``tp``.
        val_fraction: share of every class of the training split held out for selection and
            early stopping.
        steps: optimiser steps of the final training (default :data:`DEFAULT_STEPS`).
        epochs: passes over the training videos instead of ``steps`` (wins when given).
        batch_size: videos per step (default: an eighth of the training videos, within
            [:data:`MIN_BATCH`, :data:`MAX_BATCH`]).
        lr, weight_decay: fixed values; None selects them on validation from ``lr_grid`` and
            ``weight_decay_grid`` (L2 on weight matrices only).
        select_budget: the selection grid costs this many single configurations in all
            (per fold).
        min_validation, max_folds: where the validation part holds fewer than
            ``min_validation`` videos, the grid is also trained and scored on further folds of
            the same size (disjoint, stratified, from the rest of the training split, then
            from repeated seeded shuffles of it once the disjoint ones run out), up to
            ``max_folds`` folds in all, and chosen on the pooled scores: top-1 on three held-out
            videos cannot tell nine configurations apart.
        refit: train the chosen values again on the whole training split (else keep the
            chosen configuration's best-validation weights, trained on the rest).
        simplex_lr_scale: factor on the learning rate of the softmax logits of beta and of the
            fusion weights (see :func:`aggregator.train_loop.param_groups`).
        warmup: share of the steps with a linear warmup before the cosine decay.
        patience: validation passes without improvement before a configuration stops
            (None: never); there are :data:`EVALUATIONS` passes per phase.
        standardize: standardise every stream's features with training-split statistics.
        probe: fit the logistic-regression references (global mean, pyramid node means of
            ``probe_levels`` levels) and report them beside the head, and compare the head
            with them on the validation folds.
        probe_start: start a head that can represent its probe (``gap``, ``tp`` concat,
            ``tpp``) from the probe's solution, and keep that start when it validates at
            least as well as the trained head (:mod:`aggregator.probe_start`).
        inputs: ``nodes`` (cached summaries in memory) or ``frames`` (padded frames).
        pyramid_leaves: hold the temporal pyramid's nodes as their leaves (exact, cheaper).
        precision: ``bf16`` trains under bfloat16 autocast; ``auto`` picks it where native.
        threads: torch CPU threads for the run.
    """

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("streams", "lr_grid", "weight_decay_grid")

    head: str = "tp"
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fusion: Literal["learned", "fixed"] | None = None
    fusion_weights: Mapping[str, float] | None = None
    val_fraction: float = 0.1
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = None
    weight_decay: float | None = None
    lr_grid: tuple[float, ...] | None = None
    weight_decay_grid: tuple[float, ...] = DEFAULT_WEIGHT_DECAY_GRID
    select_budget: float = 2.0
    min_validation: int = MIN_VALIDATION
    max_folds: int = MAX_FOLDS
    refit: bool = True
    momentum: float = 0.9
    simplex_lr_scale: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = 0.05
    patience: int | None = 10
    grad_clip: float | None = 40.0
    device: str = "auto"
    inputs: Literal["nodes", "frames"] = "nodes"
    pyramid_leaves: bool = True
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int | None = None
    standardize: bool = True
    probe: bool = True
    probe_levels: int = 4
    probe_start: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_kwargs", dict(self.head_kwargs or {}))
        if self.precision in OLD_PRECISIONS:  # float32/bfloat16, as older configs spell them
            object.__setattr__(self, "precision", OLD_PRECISIONS[self.precision])
        if self.fusion_weights is not None:
            object.__setattr__(self, "fusion_weights", dict(self.fusion_weights))
        for name in ("lr_grid", "weight_decay_grid"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        super().validate()
        for name in ("steps", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.optimizer not in DEFAULT_LR_GRID:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.inputs not in ("nodes", "frames"):
            raise ValueError(f"inputs must be 'nodes' or 'frames', got {self.inputs!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.select_budget <= 0:
            raise ValueError(f"select_budget must be > 0, got {self.select_budget}")
        if self.max_folds < 1 or self.min_validation < 0:
            raise ValueError(
                f"max_folds must be >= 1 and min_validation >= 0, got {self.max_folds} and "
                f"{self.min_validation}"
            )
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        for name, value in (("lr", self.lr), ("weight_decay", self.weight_decay)):
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, grid in (
            ("lr_grid", self.lr_grid),
            ("weight_decay_grid", self.weight_decay_grid),
        ):
            if grid is not None and (not grid or any(v < 0 or not math.isfinite(v) for v in grid)):
                raise ValueError(f"{name} must hold finite numbers >= 0, got {grid!r}")
        if self.probe_levels < 1:
            raise ValueError(f"probe_levels must be >= 1, got {self.probe_levels}")

    # ------------------------------------------------------------------ derived
    @property
    def resolved_fusion(self) -> Literal["learned", "fixed"]:
        return self.fusion or ("fixed" if self.head == "tpp" else "learned")

    def grid(self) -> list[dict[str, float]]:
        """The (learning rate, weight decay) pairs tried: fixed values stay fixed."""
        lrs = (self.lr,) if self.lr is not None else self.lr_grid or DEFAULT_LR_GRID[self.optimizer]
        wds = (self.weight_decay,) if self.weight_decay is not None else self.weight_decay_grid
        return [{"lr": float(lr), "weight_decay": float(wd)} for lr in lrs for wd in wds]

    def default_point(self) -> dict[str, float]:
        """The grid's middle: used when there is nothing to select on."""
        lrs = (self.lr,) if self.lr is not None else self.lr_grid or DEFAULT_LR_GRID[self.optimizer]
        wds = (self.weight_decay,) if self.weight_decay is not None else self.weight_decay_grid
        return {"lr": float(lrs[len(lrs) // 2]), "weight_decay": float(wds[len(wds) // 2])}


@dataclass(frozen=True)
class MapTrainConfig(BaseTrainConfig):
    """Every option of a map-head run (``stpn``, :func:`aggregator.maps.train.train_map_run`).

    The head reads the spatial map streams (:data:`aggregator.streams.MAP_STREAMS`, always
    both); Adam with cosine decay per step picks the epoch on the validation part.

    Attributes:
        head: a key of :data:`aggregator.streams.MAP_HEADS`.
        head_kwargs: the head class's keyword arguments, e.g. ``{"out_dim": 1024}``.
        val_fraction: share of every class of the training split held out to pick the epoch
            and stop early.
        epochs, batch_size: passes over the training videos, videos per step (at least 2).
        optimizer: ``adam`` (the only one; recorded).
        lr, weight_decay: Adam's learning rate; L2 weight decay on weight matrices only.
        patience: epochs without a better validation score before training stops (None:
            never).
        grad_clip: the gradients' norm is clipped to this (None: not clipped).
        max_frames: at most this many evenly spaced map frames per video (None: all).
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        threads: torch CPU threads for the run.
    """

    head: str = "stpn"
    streams: tuple[str, ...] = MAP_STREAMS
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.1
    epochs: int = 30
    batch_size: int = 32
    optimizer: Literal["adam"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int | None = 10
    grad_clip: float | None = 40.0
    max_frames: int | None = None
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_kwargs", dict(self.head_kwargs or {}))
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        super().validate()
        if self.head not in MAP_HEADS:
            raise ValueError(
                f"head {self.head!r} does not read map streams; map heads: {MAP_HEADS}"
            )
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(
                f"need epochs >= 1 and batch_size >= 2, got {self.epochs}, {self.batch_size}"
            )
        if self.streams != MAP_STREAMS:
            raise ValueError(
                f"head {self.head!r} reads the streams {MAP_STREAMS}, got {self.streams}"
            )
        if self.optimizer != "adam":
            raise ValueError(f"head {self.head!r} trains with adam, got {self.optimizer!r}")


@dataclass(frozen=True)
class Budget:
    """Steps and batch size of a run: ``select_steps`` per grid configuration, ``steps`` for the
    final training; validation every ``eval_every`` steps of the selection."""

    batch_size: int
    steps: int
    select_steps: int
    n_configs: int

    def eval_every(self, steps: int) -> int:
        return max(1, steps // EVALUATIONS)


def default_batch_size(n_train: int) -> int:
    """An eighth of the training videos, within [MIN_BATCH, MAX_BATCH]."""
    return int(min(MAX_BATCH, max(MIN_BATCH, n_train // 8)))


def plan_budget(config: TrainConfig, n_fit: int, n_all: int, n_configs: int) -> Budget:
    """The budget of a run with ``n_fit`` videos to fit during selection, ``n_all`` (fit +
    validation) for the refit, and ``n_configs`` grid configurations."""
    if n_fit < 1 or n_all < n_fit or n_configs < 1:
        raise ValueError(f"bad sizes: n_fit={n_fit}, n_all={n_all}, n_configs={n_configs}")
    batch = config.batch_size or default_batch_size(n_fit)
    if config.epochs is not None:
        steps = config.epochs * math.ceil((n_all if config.refit else n_fit) / batch)
        full_select = config.epochs * math.ceil(n_fit / batch)
    else:
        steps = config.steps or DEFAULT_STEPS
        full_select = steps
    if n_configs == 1 or not config.refit:
        select = full_select  # the selection phase is the final training
    else:
        select = max(1, math.ceil(config.select_budget * full_select / n_configs))
    return Budget(batch_size=batch, steps=steps, select_steps=select, n_configs=n_configs)
