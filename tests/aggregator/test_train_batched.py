"""The selection grid stepped as one batched model trains what it trains one after the other."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import aggregator.batched_trials as batched_trials
from aggregator.heads import build_model
from aggregator.train_loop import (
    Trial,
    make_optimizer,
    train_trials,
    validation_spread,
    warmup_cosine,
)
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture

GRID = [{"lr": lr, "weight_decay": wd} for lr in (1e-3, 3e-3) for wd in (0.0, 1e-2)]


def _trials(head: str, kwargs: dict[str, Any], optimizer: str, steps: int) -> list[Trial]:
    torch.manual_seed(0)
    model = build_model(
        head, in_features={"appearance": 5}, num_classes=3, head_kwargs=kwargs, standardize=True
    )
    out = []
    for values in GRID:
        m = copy.deepcopy(model)
        opt = make_optimizer(m, optimizer=optimizer, **values)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0.1))
        out.append(Trial(values=dict(values), model=m, opt=opt, sched=sched))
    return out


def _batches(count: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    while True:
        y = torch.randint(3, (8,), generator=gen)
        x = torch.randn(8, count, 5, generator=gen) + y[:, None, None].float()
        yield {"appearance": x}, y


def _train(head: str, kwargs: dict[str, Any], optimizer: str, batch: bool) -> list[Trial]:
    steps = 30
    trials = _trials(head, kwargs, optimizer, steps)
    count = trials[0].model.input_specs["appearance"].count
    gen = torch.Generator().manual_seed(2)
    yv = torch.arange(12) % 3
    xv = {"appearance": torch.randn(12, count, 5, generator=gen) + yv[:, None, None].float()}

    def validate(model: Any) -> tuple[float, ...]:
        model.eval()
        with torch.no_grad():
            return validation_spread(model.forward_nodes(xv).numpy(), yv.numpy())

    old = batched_trials.MAX_BATCHED_FLOATS
    batched_trials.MAX_BATCHED_FLOATS = old if batch else 0
    try:
        train_trials(
            trials,
            _batches(count),
            steps=steps,
            device=torch.device("cpu"),
            grad_clip=1.0,
            bf16=False,
            validate=validate,
            eval_every=3,
            patience=4,
        )
    finally:
        batched_trials.MAX_BATCHED_FLOATS = old
    return trials


@pytest.mark.parametrize(
    ("head", "kwargs", "optimizer"),
    [
        ("datp", {"dropout": 0.0}, "adam"),
        ("gap", {"dropout": 0.0}, "sgd"),
        ("tp", {"variant": "average", "depth": 3, "dropout": 0.0}, "adam"),
        ("tpp", {"dropout": 0.0}, "adam"),
    ],
)
def test_batched_grid_trains_what_the_loop_trains(
    head: str, kwargs: dict[str, Any], optimizer: str
) -> None:
    """Every configuration's weights, buffers, records, early stop and best weights agree
    (clipping active, weight decay on some configurations, stops at different steps)."""
    trials = _trials(head, kwargs, optimizer, 30)
    count = trials[0].model.input_specs["appearance"].count
    assert batched_trials.batchable(trials, next(_batches(count))[0])
    loop = _train(head, kwargs, optimizer, batch=False)
    stacked = _train(head, kwargs, optimizer, batch=True)
    for a, b in zip(loop, stacked, strict=True):
        assert (a.steps_run, a.best_step, a.running) == (b.steps_run, b.best_step, b.running)
        assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
        np.testing.assert_allclose(
            [h["train_loss"] for h in a.history], [h["train_loss"] for h in b.history], rtol=1e-4
        )
        for key, value in a.model.state_dict().items():
            torch.testing.assert_close(b.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
        assert a.best_state is not None and b.best_state is not None
        for key, value in a.best_state.items():
            torch.testing.assert_close(b.best_state[key], value, rtol=1e-4, atol=1e-5)


def test_large_or_unbatchable_steps_stay_in_the_loop() -> None:
    trials = _trials("datp", {"dropout": 0.0}, "adam", 10)
    nodes = {"appearance": torch.zeros(8, 10, 5)}
    assert batched_trials.batchable(trials, nodes)
    assert not batched_trials.batchable(trials[:1], nodes)  # one configuration
    assert not batched_trials.batchable(trials, (nodes, torch.ones(8)))  # padded frames
    big = {"appearance": torch.zeros(8, 10, batched_trials.MAX_BATCHED_FLOATS)}
    assert not batched_trials.batchable(trials, big)
    attn = _trials("attn", {}, "adam", 10)
    assert not batched_trials.batchable(attn, {"appearance": torch.zeros(8, 10, 5)})
    mixed = trials[:1] + _trials("datp", {"dropout": 0.0}, "sgd", 10)[1:]
    assert not batched_trials.batchable(mixed, nodes)


def test_batched_grid_under_bfloat16_autocast() -> None:
    """Batch norm after a bfloat16 matmul (tp concat's node projection) trains batched as in
    the loop, up to bfloat16 rounding."""
    kwargs = {"variant": "concat", "depth": 3, "node_dim": 4, "dropout": 0.0}
    runs = []
    for batch in (False, True):
        trials = _trials("tp", kwargs, "adam", 30)
        old = batched_trials.MAX_BATCHED_FLOATS
        batched_trials.MAX_BATCHED_FLOATS = old if batch else 0
        try:
            train_trials(
                trials, _batches(7), steps=30, device=torch.device("cpu"), grad_clip=1.0, bf16=True
            )
        finally:
            batched_trials.MAX_BATCHED_FLOATS = old
        runs.append([t.history[-1]["train_loss"] for t in trials])
    np.testing.assert_allclose(runs[1], runs[0], rtol=2e-2)
