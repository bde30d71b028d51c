"""How the selection chooses on a few validation videos."""

from __future__ import annotations

import math

import numpy as np
import torch

from aggregator.selection import Selection, one_standard_error, pooled_scores
from aggregator.train_loop import Trial, validation_score, validation_spread

GRID = [{"lr": lr, "weight_decay": wd} for lr in (1e-3, 1e-2, 1e-1) for wd in (1e-4, 1e-2)]


def _trial(values: dict[str, float], passes: list[tuple[int, float, float, float]]) -> Trial:
    """A trained-looking trial whose history holds ``(step, top1, loss, loss_sq)`` passes."""
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    t = Trial(values=values, model=model, opt=opt, sched=sched)  # type: ignore[arg-type]
    for step, top1, loss, sq in passes:
        t.history.append({"step": step, "val_top1": top1, "val_loss": loss, "val_loss_sq": sq})
    t.best_step = max(passes, key=lambda p: -p[2])[0]
    return t


def test_validation_spread_gives_the_standard_error_of_the_loss() -> None:
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 4)), rng.integers(0, 4, size=50)
    top1, loss, sq = validation_spread(logits, labels)
    z = logits - logits.max(1, keepdims=True)
    per_video = -(z[np.arange(50), labels] - np.log(np.exp(z).sum(1)))
    assert math.isclose(loss, per_video.mean(), rel_tol=1e-5)
    assert math.isclose(sq, (per_video**2).mean(), rel_tol=1e-5)
    assert validation_score(logits, labels) == (top1, loss)


def test_one_standard_error_takes_the_most_conservative_near_best_point() -> None:
    # losses: the lowest is lr 1e-2 / wd 1e-4 (0.90, standard error 0.15); lr 1e-3 / wd 1e-2
    # (1.00) is within it, lr 1e-1 is not
    losses = [1.10, 1.00, 0.90, 0.95, 1.50, 1.40]
    scores = [(0.5, -v) for v in losses]
    errors = [0.15] * len(GRID)
    assert GRID[one_standard_error(GRID, scores, errors)] == {"lr": 1e-3, "weight_decay": 1e-2}
    # a tight error keeps the lowest loss
    tight = [0.01] * len(GRID)
    assert GRID[one_standard_error(GRID, scores, tight)] == {"lr": 1e-2, "weight_decay": 1e-4}
    # no error known: the lowest loss, first wins ties
    assert one_standard_error(GRID, scores, [math.nan] * len(GRID)) == 2
    assert one_standard_error(GRID, [(0.5, -1.0)] * len(GRID), [math.nan] * len(GRID)) == 0


def test_pooled_scores_pool_losses_and_their_spread_over_folds() -> None:
    # two folds of 10 and 30 videos; at step 20 the pooled loss is lowest
    a = _trial(GRID[0], [(10, 0.5, 1.0, 2.0), (20, 0.6, 0.8, 1.0)])
    b = _trial(GRID[0], [(10, 0.4, 1.2, 2.0), (20, 0.5, 1.0, 1.5)])
    (score,), (step,), (se,) = pooled_scores([[a], [b]], [10, 30])
    loss = (10 * 0.8 + 30 * 1.0) / 40
    sq = (10 * 1.0 + 30 * 1.5) / 40
    assert step == 20
    assert math.isclose(-score[1], loss) and math.isclose(score[0], (6 + 15) / 40)
    assert math.isclose(se, math.sqrt((sq - loss**2) / 40))


def test_the_validation_peak_is_reported_from_the_pooled_pass() -> None:
    t = _trial(GRID[0], [(50, 0.5, 1.0, 2.0)])
    assert Selection([t], dict(GRID[0]), t, 0.0, select_steps=200).peak_fraction == 0.25
    pooled = Selection([t], dict(GRID[0]), t, 0.0, best_steps=[100], select_steps=200)
    assert pooled.peak_fraction == 0.5
    assert Selection([], dict(GRID[0]), None, 0.0).peak_fraction == 1.0
