"""Step 2 of a deep-head run (:mod:`aggregator.train`): the folds of the training videos, the
grid of learning rates and weight decays trained on each and scored on its validation videos,
and the choice (on the scores pooled over the folds when there are several)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.run_data import RunData, standardization_stats
from aggregator.rundir import further_folds
from aggregator.train_config import Budget, TrainConfig
from aggregator.train_loop import Trial, choose, train_trials
from aggregator.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = [
    "Fold",
    "Selection",
    "one_standard_error",
    "pooled_scores",
    "select",
    "selection_folds",
]


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
