"""The optimisation step of training: optimisers, the warmup + cosine schedule, and a loop that
trains several configurations of a head together on the same batches.

:func:`train_trials` draws each batch once and takes one step of every configuration still
running on it (the grid of the selection shares the data pass: the node tensors are gathered and
converted once per step, not once per configuration), validates every ``eval_every`` steps, keeps
each configuration's best weights (validation top-1, ties to the lower loss) and stops a
configuration after ``patience`` validation passes without improvement.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aggregator.heads import VideoModel

log = logging.getLogger(__name__)

Batch = tuple[Any, torch.Tensor]  # (node inputs or (frames, lengths), labels)


def param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, simplex_lr_scale: float
) -> list[dict[str, Any]]:
    """L2 weight decay on weight matrices only (not on biases, norms, beta or fusion weights).

    The softmax logits of beta and of the fusion weights get ``simplex_lr_scale`` times the
    learning rate (1 by default). Adam moves every parameter by about its learning rate per
    update whatever the size of its gradient, so over a budget of a thousand updates the logits
    can travel about ``lr * simplex_lr_scale * 500``: at ten times a learning rate of 1e-2 that
    is tens of nats, and beta collapses onto a few of the finest nodes that fit the training
    videos (measured on 98 recordings of 7 subjects: 71% on new subjects against 83-86% with
    the logits at the common learning rate of 1e-3).
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


def make_optimizer(
    model: torch.nn.Module,
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    simplex_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """Adam or SGD with momentum over :func:`param_groups`."""
    groups = param_groups(model, lr, weight_decay, simplex_lr_scale)
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def warmup_cosine(steps: int, warmup: float, schedule: str = "cosine") -> Callable[[int], float]:
    """Learning-rate factor of step ``k`` (0-based): linear warmup over ``warmup * steps``
    steps, then cosine decay to 0 at ``steps`` (``schedule="constant"``: 1 after the warmup)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n_warm = int(warmup * steps)

    def factor(k: int) -> float:
        if k < n_warm:
            return (k + 1) / (n_warm + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - n_warm) / max(1, steps - n_warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_step(
    model: VideoModel,
    inputs: Any,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    *,
    device: torch.device,
    grad_clip: float | None,
    bf16: bool,
) -> tuple[float, int]:
    """One optimiser step; returns the batch's loss and its number of correct predictions."""
    model.train()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with amp:
        if isinstance(inputs, tuple):
            feats, lengths = inputs
            logits = model({s: t.to(device) for s, t in feats.items()}, lengths.to(device))
        else:
            logits = model.forward_nodes(inputs)
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


def fit_epoch(
    model: VideoModel,
    batches: Any,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    device: torch.device | str = "cpu",
    grad_clip: float | None = None,
    bf16: bool = False,
) -> tuple[float, float]:
    """One pass over ``batches`` (``(inputs, labels)``); the mean loss and top-1 of the pass."""
    dev = torch.device(device)
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, y in batches:
        y = y.to(dev)
        if len(y) < 2:
            continue  # batch norm needs two samples; a lone leftover video waits a turn
        loss, right = train_step(model, inputs, y, opt, device=dev, grad_clip=grad_clip, bf16=bf16)
        if sched is not None:
            sched.step()
        loss_sum += loss * len(y)
        correct += right
        seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@dataclass
class Trial:
    """One configuration being trained: its values, model, optimiser and record."""

    values: dict[str, float]
    model: VideoModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    history: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float, float] = (-1.0, -math.inf)
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    running: bool = True
    steps_run: int = 0
    _loss: float = 0.0
    _correct: int = 0
    _seen: int = 0

    def summary(self) -> dict[str, Any]:
        val = self.history[-1] if self.history else {}
        return {
            **self.values,
            "val_top1": self.best[0] if self.best_state is not None else None,
            "val_loss": -self.best[1] if self.best_state is not None else None,
            "best_step": self.best_step,
            "steps_run": self.steps_run,
            "last_val_top1": val.get("val_top1"),
        }


def endless_batches(make_epoch: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
    """Batches of epoch after epoch; batches of fewer than two videos are skipped."""
    while True:
        produced = False
        for inputs, y in make_epoch():
            if len(y) < 2:
                continue
            produced = True
            yield inputs, y
        if not produced:
            raise ValueError("no batch of at least two videos to train on")


def train_trials(
    trials: Sequence[Trial],
    batches: Iterator[Batch],
    *,
    steps: int,
    device: torch.device,
    grad_clip: float | None,
    bf16: bool,
    validate: Callable[[VideoModel], tuple[float, ...]] | None = None,
    eval_every: int = 1,
    patience: int | None = None,
    epoch_steps: int = 1,
) -> float:
    """Train ``trials`` together for ``steps`` steps on the same batches; returns the seconds.

    ``validate(model) -> (top1, loss[, mean squared loss])`` runs every ``eval_every`` steps and
    at the end; without it the trials just train (their weights at the end are the result).
    """
    t0 = time.perf_counter()
    if steps >= 1 and len(trials) > 1 and all(t.running for t in trials):
        from aggregator.batched_trials import batchable, train_batched

        first = next(batches)
        if batchable(trials, first[0]):  # a few small kernels per step: one batched model
            return train_batched(
                trials, batches, first, steps=steps, device=device, grad_clip=grad_clip,
                bf16=bf16, validate=validate, eval_every=eval_every, patience=patience,
                epoch_steps=epoch_steps, record=_record,
            )  # fmt: skip
        batches = itertools.chain([first], batches)
    for step in range(1, steps + 1):
        active = [t for t in trials if t.running]
        if not active:
            break
        inputs, y = next(batches)
        y = y.to(device)
        for t in active:
            loss, right = train_step(
                t.model, inputs, y, t.opt, device=device, grad_clip=grad_clip, bf16=bf16
            )
            t.sched.step()
            t.steps_run = step
            t._loss += loss * len(y)
            t._correct += right
            t._seen += len(y)
        if step % eval_every == 0 or step == steps:
            for t in active:
                _record(t, step, epoch_steps, validate, patience)
    return time.perf_counter() - t0


def _record(
    t: Trial,
    step: int,
    epoch_steps: int,
    validate: Callable[[VideoModel], tuple[float, ...]] | None,
    patience: int | None,
) -> None:
    record: dict[str, Any] = {
        "step": step,
        "epoch": step / epoch_steps,
        "train_loss": t._loss / max(t._seen, 1),
        "train_top1": t._correct / max(t._seen, 1),
        "lr": t.opt.param_groups[0]["lr"],
    }
    t._loss, t._correct, t._seen = 0.0, 0, 0
    if validate is not None:
        top1, loss, *spread = validate(t.model)
        record.update(val_loss=loss, val_top1=top1)
        if spread:
            record["val_loss_sq"] = spread[0]
        score = (top1, -loss if math.isfinite(loss) else -math.inf)
        if score > t.best or t.best_state is None:
            t.best, t.best_step, t.stale = score, step, 0
            t.best_state = copy.deepcopy(t.model.state_dict())
        else:
            t.stale += 1
            if patience is not None and t.stale >= patience:
                t.running = False
                log.info("%s: early stop at step %d (best %d)", t.values, step, t.best_step)
    t.history.append(record)
    log.info("%s step %d %s", t.values, step, {k: round(v, 4) for k, v in record.items()})


def choose(trials: Sequence[Trial]) -> Trial:
    """The trial with the best validation (top-1, then lower loss); first wins ties."""
    return max(trials, key=lambda t: t.best)


def validation_score(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(top1, mean cross-entropy)`` of logits ``[n, C]`` (or log-probabilities)."""
    top1, loss, _ = validation_spread(logits, labels)
    return top1, loss


def validation_spread(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """``(top1, mean cross-entropy, mean squared cross-entropy)`` of logits ``[n, C]``: the
    last gives the standard error of the mean loss."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    z = torch.from_numpy(np.asarray(logits)).float()
    if not len(y):
        return math.nan, math.nan, math.nan
    losses = F.cross_entropy(z, y, reduction="none").double()
    top1 = float((z.argmax(1) == y).float().mean())
    return top1, float(losses.mean()), float((losses * losses).mean())
