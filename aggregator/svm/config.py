"""What an SVM run is asked to do (:class:`SVMConfig`), ``framepool train --head svm``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from aggregator.train_config import BaseTrainConfig

if TYPE_CHECKING:
    from aggregator.svm.estimator import MultipleAggregationSVM

C_GRID = (0.1, 1.0, 10.0)
GAMMA_GRID = (0.25, 1.0, 4.0)  # factors on the per-node "scale" gamma (rbf and chi2 kernels)
MAX_LEVELS = 6  # levels=None chooses the pyramid depth among 1..MAX_LEVELS


@dataclass(frozen=True)
class SVMConfig(BaseTrainConfig):
    """Every option of an SVM run (:func:`aggregator.svm.run.train_svm`):
    :class:`aggregator.train_config.BaseTrainConfig`'s and its own.

    Attributes:
        head: ``svm``.
        streams: stream names, one multiple-aggregation SVM each, their scores fused.
        levels: pyramid depth; None chooses it among 1 to :data:`MAX_LEVELS` on the
            validation folds.
        variant, kernel, max_iter, eps, svm_max_iter: the estimator's
            (:class:`aggregator.svm.estimator.MultipleAggregationSVM`).
        C: the soft-margin ``C``; None selects it from ``C_grid`` on the validation folds, and
            for the rbf/chi2 kernels a factor on the gamma from ``gamma_grid`` (default
            :data:`GAMMA_GRID` when ``C`` is selected, else 1: a given ``C`` is a fixed
            configuration).
        seed: seeds the validation part, the folds, the subsamples and the estimator.
        refit: fit the chosen values again on the whole training split (else on the fit
            videos of the validation part).
        standardize_inputs: standardise node means with training statistics (never for the
            chi2 kernel, which needs non-negative features).
        probe: fit and report the linear-probe references.
        probe_levels: pyramid levels of the node-mean probe.
        probe_start: compare the chosen SVM with the node-mean probe (of ``levels`` levels when
            given, else of ``probe_levels``) on the same validation folds and keep the probe
            when it validates at least as well.
    """

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("streams", "C_grid", "gamma_grid")

    head: str = "svm"
    levels: int | None = None
    variant: str = "concat"
    C: float | None = None
    kernel: str = "linear"
    max_iter: int = 50
    eps: float = 1e-3
    C_grid: tuple[float, ...] = C_GRID
    gamma_grid: tuple[float, ...] | None = None
    refit: bool = True
    standardize_inputs: bool = True
    probe: bool = True
    probe_levels: int = 4
    svm_max_iter: int | str | None = "auto"
    probe_start: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "C_grid", tuple(self.C_grid))
        if self.gamma_grid is not None:
            object.__setattr__(self, "gamma_grid", tuple(self.gamma_grid))
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError naming the first option that is out of range (the estimator's
        options are checked by the estimator, for every ``C`` tried)."""
        from sklearn.base import clone

        super().validate()
        if self.head != "svm":
            raise ValueError(f"an SVMConfig's head is 'svm', got {self.head!r}")
        if self.levels is not None and (not isinstance(self.levels, int) or self.levels < 1):
            raise ValueError(f"levels must be an integer >= 1 or None, got {self.levels!r}")
        c_values = self.c_values  # raises for an empty C_grid
        self.gamma_values  # noqa: B018 (raises for a gamma factor that is not positive)
        estimator = self.estimator()
        for c in c_values:
            clone(estimator).set_params(C=c).check_params()

    # ------------------------------------------------------------------ derived
    @property
    def depths(self) -> list[int]:
        """The pyramid depths the selection tries."""
        return list(range(1, MAX_LEVELS + 1)) if self.levels is None else [self.levels]

    @property
    def c_values(self) -> list[float]:
        """The values of ``C`` the selection tries."""
        c_grid = [float(self.C)] if self.C is not None else [float(c) for c in self.C_grid]
        if not c_grid:
            raise ValueError("C_grid is empty")
        return c_grid

    @property
    def gamma_values(self) -> list[float]:
        """The factors on the gamma the selection tries (1 for the linear kernel)."""
        gamma_grid = self.gamma_grid
        if gamma_grid is None:
            gamma_grid = GAMMA_GRID if self.C is None else (1.0,)
        g_grid = [float(g) for g in gamma_grid] if self.kernel != "linear" else [1.0]
        if not g_grid or any(not math.isfinite(g) or g <= 0 for g in g_grid):
            raise ValueError(f"gamma_grid must hold positive numbers, got {list(gamma_grid)!r}")
        return g_grid

    @property
    def selecting(self) -> bool:
        """Whether there is more than one grid point to choose from."""
        return len(self.depths) * len(self.c_values) * len(self.gamma_values) > 1

    @property
    def use_stats(self) -> bool:
        """Whether node means are standardised (never for the chi2 kernel)."""
        return self.standardize_inputs and self.kernel != "chi2"

    def estimator(self) -> MultipleAggregationSVM:
        """The estimator the run fits, at the first ``C`` tried."""
        from aggregator.svm.estimator import MultipleAggregationSVM

        return MultipleAggregationSVM(
            C=self.c_values[0],
            variant=self.variant,
            kernel=self.kernel,
            max_iter=self.max_iter,
            eps=self.eps,
            svm_max_iter=self.svm_max_iter,
            random_state=self.seed,
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The run's ``train_args`` in ``config.json``: the options (``head`` aside, which
        ``config.json`` holds once) with the depths and grids the selection tries
        (:meth:`from_dict` reads it back to a config that writes the same)."""
        return {
            "streams": list(self.streams),
            "levels": self.levels,
            "depths": self.depths,
            "variant": self.variant,
            "C": self.C,
            "C_grid": self.c_values,
            "gamma_grid": self.gamma_values,
            "kernel": self.kernel,
            "train_split": self.train_split,
            "test_split": self.test_split,
            "seed": self.seed,
            "max_iter": self.max_iter,
            "eps": self.eps,
            "svm_max_iter": self.svm_max_iter,
            "refit": self.refit,
            "val_groups": self.val_groups,
            "standardize_inputs": self.standardize_inputs,
            "probe": self.probe,
            "probe_levels": self.probe_levels,
            "probe_start": self.probe_start,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """A config from :meth:`to_dict` output (``depths`` is derived and skipped); unknown
        keys are an error naming them."""
        return super().from_dict({k: v for k, v in values.items() if k != "depths"})
