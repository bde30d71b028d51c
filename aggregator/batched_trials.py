"""The configurations of a selection grid stepped as one batched model.

The grid's configurations share their architecture and their batches and differ in learning
rate and weight decay only. On a few dozen short videos a training step of a small head is some
hundreds of tiny kernels whose cost is their dispatch, whatever the batch holds, so nine
configurations stepped one after the other cost nine times one of them. Here their parameters
and buffers are stacked along a leading axis and one vectorised forward and backward
(:func:`torch.func.vmap` over :func:`torch.func.functional_call`) serves them all; the optimiser
step (Adam or SGD with momentum, as :func:`aggregator.train_loop.make_optimizer` builds them,
with each configuration's own learning rates, schedule and weight decay) and the gradient-norm
clip run on the stacked tensors. Each configuration keeps its own record, early stop and best
weights exactly as :func:`aggregator.train_loop.train_trials` keeps them; dropout draws one
mask for all configurations of a step (each configuration still sees a fresh mask every step).

Where the per-step work is large (UCF101's thousands of features), the stacked matmuls cost what
nine separate ones cost and stacking only adds copies: :func:`batchable` keeps the one after the
other loop there.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from aggregator.heads import VideoModel

# Steps are batched where one configuration's step is small: at most this many node-input
# entries in a batch and parameters per configuration. Measured on 2 cores, 1 thread, nine
# configurations, CPU ms per step one after the other / batched: datp (8 videos, 10 x 12,
# 31k parameters) 47.7 / 14.4, (64 videos, 10 x 256) 86.6 / 54.2, (32 videos, 10 x 2048) 134.6 /
# 167.1; gap (64 videos, d = 256, 101 classes) 16.1 / 11.3, (8 videos, d = 2048) 27.6 / 38.5;
# tp concat (8 videos, 63 x 12, 90k parameters) 32.0 / 31.9.
MAX_BATCHED_FLOATS = 1 << 18
MAX_BATCHED_PARAMETERS = 1 << 16
_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False}


def _float_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A batch norm's input as float32: under bfloat16 autocast the vectorised batch norm
    takes no bfloat16 input beside its float32 statistics (the loop's batch norm accumulates in
    float32 too)."""
    return tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)


class _Nodes(nn.Module):
    """``model.forward_nodes`` as a module's ``forward`` (what ``functional_call`` calls)."""

    def __init__(self, model: VideoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.model.forward_nodes(inputs)


def _input_floats(inputs: Any) -> int:
    """Entries of a batch's node inputs (tensors or :class:`PyramidLeaves`)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.numel()
    if isinstance(inputs, dict):
        return sum(_input_floats(v) for v in inputs.values())
    leaves = getattr(inputs, "leaves", None)
    return leaves.numel() if isinstance(leaves, torch.Tensor) else 0


def _optimizer_kind(opt: torch.optim.Optimizer) -> str | None:
    """``adam`` / ``sgd`` when ``opt`` is one this module can step as torch would, else None."""
    if type(opt) is torch.optim.Adam:
        d = opt.defaults
        plain = all(d.get(k) == v for k, v in _ADAM_DEFAULTS.items())
        return "adam" if plain and not d.get("decoupled_weight_decay", False) else None
    if type(opt) is torch.optim.SGD:
        d = opt.defaults
        plain = not d.get("nesterov") and not d.get("dampening") and not d.get("maximize")
        return "sgd" if plain else None
    return None


def batchable(trials: Sequence[Any], inputs: Any) -> bool:
    """Whether ``trials`` can be stepped as one batched model on batches like ``inputs``:
    node inputs (not padded frames) of at most :data:`MAX_BATCHED_FLOATS` entries, models of
    at most :data:`MAX_BATCHED_PARAMETERS` parameters and of one architecture (same parameter
    and buffer names and shapes, integer buffers equal), one optimiser kind."""
    if len(trials) < 2 or isinstance(inputs, tuple):
        return False
    if _input_floats(inputs) > MAX_BATCHED_FLOATS:
        return False
    if sum(p.numel() for p in trials[0].model.parameters()) > MAX_BATCHED_PARAMETERS:
        return False
    if not all(getattr(m, "batch_steps", True) for m in trials[0].model.modules()):
        return False
    kinds = {_optimizer_kind(t.opt) for t in trials}
    if len(kinds) != 1 or None in kinds:
        return False
    first = trials[0].model.state_dict()
    for t in trials[1:]:
        state = t.model.state_dict()
        if state.keys() != first.keys():
            return False
        for k, v in state.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype:
                return False
            if not v.is_floating_point() and not torch.equal(v, first[k]):
                return False
    return _stack(trials) is not None


@dataclass
class _Stack:
    """The trials' trainable parameters as one flat ``[K, P]`` tensor (row k: trial k), their
    floating buffers stacked ``[K, ...]``, the integer buffers they share, and per parameter
    entry its optimiser group, learning rate and weight decay by trial, and optimiser state."""

    flat: torch.Tensor  # [K, P], requires grad
    layout: list[tuple[str, int, int, torch.Size]]  # name, offset, entries, shape
    buffers: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    group_of: torch.Tensor  # [P] the optimiser group of every entry
    weight_decay: torch.Tensor  # [K, P]
    moments: list[torch.Tensor]
    step: int = 0

    @property
    def decays(self) -> bool:
        return bool(self.weight_decay.any())

    def views(self) -> dict[str, torch.Tensor]:
        """``{name: [K, *shape]}`` views of :attr:`flat` (autograd sees them as its slices)."""
        k = self.flat.shape[0]
        return {n: self.flat[:, o : o + m].view(k, *shape) for n, o, m, shape in self.layout}


def _stack(trials: Sequence[Any]) -> _Stack | None:
    """The trials stacked, or None when their optimiser groups differ in which parameters they
    hold (the grid's configurations share them) or the parameters differ in dtype."""
    named = [dict(t.model.named_parameters()) for t in trials]
    trainable = [n for n, p in named[0].items() if p.requires_grad]
    if len({named[0][n].dtype for n in trainable}) > 1:
        return None
    buffers: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for name, p0 in named[0].items():
        if not p0.requires_grad:  # a frozen parameter travels with the buffers
            buffers[name] = torch.stack([p[name].detach() for p in named])
    for name, b in trials[0].model.named_buffers():
        if b.is_floating_point():
            others = [dict(t.model.named_buffers())[name] for t in trials]
            buffers[name] = torch.stack([o.detach() for o in others])
        else:
            shared[name] = b.detach().clone()
    layout: list[tuple[str, int, int, torch.Size]] = []
    groups: list[int | None] = []
    offset = 0
    for name in trainable:
        shape = named[0][name].shape
        layout.append((name, offset, named[0][name].numel(), shape))
        offset += named[0][name].numel()
    for t, p in zip(trials, named, strict=True):
        where = {id(q): g for g, group in enumerate(t.opt.param_groups) for q in group["params"]}
        mine: list[int | None] = [where.get(id(p[name])) for name in trainable]
        if None in mine or (groups and mine != groups):
            return None
        groups = mine
    flat = torch.cat(
        [torch.stack([p[name].detach().reshape(-1) for p in named]) for name in trainable], 1
    ).requires_grad_(True)
    sizes = torch.tensor([m for _, _, m, _ in layout])
    group_of = torch.repeat_interleave(torch.tensor(groups, dtype=torch.long), sizes)
    decay = torch.tensor(
        [[g["weight_decay"] for g in t.opt.param_groups] for t in trials], dtype=flat.dtype
    )
    return _Stack(flat, layout, buffers, shared, group_of, decay[:, group_of], [])


def _flat_gradient(
    stack: _Stack, grads: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the views as one ``[K, P]`` tensor, and ``[P]`` 1 where the forward
    pass used the entry (0 where its parameter got no gradient)."""
    k = stack.flat.shape[0]
    parts, used = [], []
    for g, (_, _, m, _) in zip(grads, stack.layout, strict=True):
        parts.append(g.reshape(k, m) if g is not None else stack.flat.new_zeros(k, m))
        used.append(stack.flat.new_full((m,), float(g is not None)))
    return torch.cat(parts, 1), torch.cat(used)


@torch.no_grad()
def _optimizer_step(
    stack: _Stack,
    trials: Sequence[Any],
    grad: torch.Tensor,
    used: torch.Tensor,
    kind: str,
    running: list[bool],
    grad_clip: float | None,
) -> None:
    """One step of every running trial's optimiser on the flat parameters ``[K, P]`` with
    gradient ``grad`` (a stopped trial's learning rate is 0: it keeps its weights; entries
    not ``used`` by the forward pass keep theirs, as torch skips a parameter without
    gradient)."""
    flat = stack.flat
    if grad_clip:  # torch.nn.utils.clip_grad_norm_, per trial over all its parameters
        norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        grad.mul_((grad_clip / (norm + 1e-6)).clamp_(max=1.0))
    stack.step += 1
    lrs = torch.tensor(
        [
            [g["lr"] * keep for g in t.opt.param_groups]
            for t, keep in zip(trials, running, strict=True)
        ],
        dtype=flat.dtype,
    )
    lr = lrs.index_select(1, stack.group_of)  # [K, P]
    if not bool(used.all()):
        lr.mul_(used)
    if stack.decays:
        grad.addcmul_(stack.weight_decay, flat)
    group = trials[0].opt.param_groups[0]
    if kind == "sgd":
        momentum = group["momentum"]
        if not stack.moments:
            stack.moments.append(grad.clone())
        elif momentum:
            stack.moments[0].mul_(momentum).add_(grad)
        flat.sub_(lr.mul_(stack.moments[0] if momentum else grad))
        return
    beta1, beta2 = group["betas"]
    if not stack.moments:
        stack.moments += [torch.zeros_like(flat), torch.zeros_like(flat)]
    exp_avg, exp_avg_sq = stack.moments
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**stack.step)).add_(group["eps"])
    step_size = lr.div_(1 - beta1**stack.step)
    flat.sub_(torch.div(exp_avg, denom).mul_(step_size))


@torch.no_grad()
def _unstack(stack: _Stack, trial: Any, k: int) -> None:
    """Trial ``k``'s slice of the stacked tensors copied into its own model."""
    params = dict(trial.model.named_parameters())
    for name, o, m, shape in stack.layout:
        params[name].copy_(stack.flat[k, o : o + m].view(shape))
    for name, p in params.items():
        if name in stack.buffers:
            p.copy_(stack.buffers[name][k])
    for name, b in trial.model.named_buffers():
        b.copy_(stack.buffers[name][k] if name in stack.buffers else stack.shared[name])


def _account(
    trials: Sequence[Any],
    running: list[bool],
    step: int,
    losses: torch.Tensor,
    right: torch.Tensor,
    n: int,
) -> None:
    """Each running trial's scheduler step and running loss and accuracy after a stacked step of
    ``n`` videos (``losses``, ``right``: one value per trial)."""
    loss_values, right_values = losses.detach().tolist(), right.tolist()
    for k, t in enumerate(trials):
        if not running[k]:
            continue
        with warnings.catch_warnings():  # the stacked step stands for t.opt.step()
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            t.sched.step()
        t.steps_run = step
        t._loss += loss_values[k] * n
        t._correct += int(right_values[k])
        t._seen += n


def train_batched(
    trials: Sequence[Any],
    batches: Iterator[Any],
    first: Any,
    *,
    steps: int,
    device: torch.device,
    grad_clip: float | None,
    bf16: bool,
    validate: Callable[[VideoModel], tuple[float, ...]] | None,
    eval_every: int,
    patience: int | None,
    epoch_steps: int,
    record: Callable[..., None],
) -> float:
    """:func:`aggregator.train_loop.train_trials` for :func:`batchable` trials, ``first``
    being the batch already drawn from ``batches``; returns the seconds."""
    t0 = time.perf_counter()
    kind = _optimizer_kind(trials[0].opt)
    assert kind is not None
    stack = _stack(trials)
    assert stack is not None
    module = _Nodes(trials[0].model)
    hooks = [
        m.register_forward_pre_hook(_float_input)
        for m in module.modules()
        if bf16 and isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:

        def loss_of(
            params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], inputs: Any, y: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            state = {f"model.{n}": v for n, v in {**params, **buffers}.items()}
            state.update({f"model.{n}": v for n, v in stack.shared.items()})
            logits = functional_call(module, state, (inputs,))
            return F.cross_entropy(logits.float(), y), logits.argmax(1)

        running = [True] * len(trials)
        amp = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        )
        batch = first
        for step in range(1, steps + 1):
            if not any(running):
                break
            if step > 1:
                batch = next(batches)
            inputs, y = batch
            y = y.to(device)
            module.train()  # validation left the first trial's model in eval mode
            batched = vmap(
                lambda p, b, inputs=inputs, y=y: loss_of(p, b, inputs, y),
                in_dims=(0, 0),
                randomness="same",
            )
            views = stack.views()
            with amp:
                losses, predicted = batched(views, stack.buffers)
            grads = torch.autograd.grad(losses.sum(), list(views.values()), allow_unused=True)
            grad, used = _flat_gradient(stack, grads)
            _optimizer_step(stack, trials, grad, used, kind, running, grad_clip)
            _account(trials, running, step, losses, (predicted == y).sum(1), len(y))
            if step % eval_every == 0 or step == steps:
                for k, t in enumerate(trials):
                    if running[k]:
                        _unstack(stack, t, k)
                        record(t, step, epoch_steps, validate, patience)
                        running[k] = t.running
        for k, t in enumerate(trials):
            if running[k]:
                _unstack(stack, t, k)
            t.model.train()
        return time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
