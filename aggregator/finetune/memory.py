"""Frames with gradient per backward chunk, chosen from a memory budget.

With ``grad_frames`` unset, :func:`choose_grad_frames` measures what the backbones keep for the
backward pass of one frame (the bytes autograd saves, parameters left out) and lets one chunk's
activations take a third of the memory budget (:func:`aggregator.caches.memory_budget`,
``--memory-budget``). The rest holds the weights, their gradients and momentum, the no-gradient
passes over ``chunk_size`` frames, the backward pass's own buffers (about the size of the saved
activations again) and the decoded inputs. Every chunk size gives the same gradients
(:func:`aggregator.finetune.surrogate.step_in_chunks`), so the budget changes memory and time,
never the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from aggregator.finetune.surrogate import FinetuneModel, frame_loader

log = logging.getLogger(__name__)

ACTIVATION_SHARE = 3  # one chunk's saved activations take at most budget // ACTIVATION_SHARE
MAX_GRAD_FRAMES = 1024


def activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for the backward pass of ``module(x)`` (each storage once; the
    module's parameters, which exist anyway, left out)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(saved.values())


def activation_bytes_per_frame(
    model: FinetuneModel,
    frames: Mapping[str, Any],
    autocast: Callable[[], AbstractContextManager[Any]],
) -> dict[str, int]:
    """Per stream, the activation bytes of one frame with gradient (measured on ``frames``, one
    video's stored inputs, as the training step prepares them)."""
    was_training = model.training
    model.train()  # the training mode (BatchNorm frozen), as in the step
    out = {}
    try:
        for stream in model.streams:
            x = frame_loader(frames[stream], model._prepare.get(stream))(torch.tensor([0]))
            with autocast():
                out[stream] = activation_bytes(model.backbones[stream], x)
    finally:
        model.train(was_training)
    return out


def grad_frames_for(per_frame: Mapping[str, int], budget: int) -> int:
    """The frames with gradient of one backward chunk whose activations fit a third of
    ``budget`` bytes, with the stream that keeps most per frame (streams run one at a time)."""
    if not per_frame:
        raise ValueError("no stream to size the backward chunks for")
    worst = max(1, max(per_frame.values()))
    return int(max(1, min(MAX_GRAD_FRAMES, (max(0, budget) // ACTIVATION_SHARE) // worst)))


def choose_grad_frames(
    model: FinetuneModel,
    frames: Mapping[str, Any],
    *,
    given: int | None,
    budget: int | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """The run's record of its backward chunks: ``given`` (``--grad-frames``) wins; else the
    value :func:`grad_frames_for` picks under ``budget`` (default: the memory budget)."""
    if given is not None:
        return {"grad_frames": int(given), "chosen_by": "grad_frames"}
    from contextlib import nullcontext

    from aggregator.caches import memory_budget

    budget = memory_budget() if budget is None else budget
    per_frame = activation_bytes_per_frame(model, frames, autocast or nullcontext)
    chosen = grad_frames_for(per_frame, budget)
    log.info(
        "%d frames with gradient per backward chunk (memory budget %.2f GiB, activations "
        "%s MiB per frame)",
        chosen,
        budget / 2**30,
        ", ".join(f"{s} {b / 2**20:.0f}" for s, b in per_frame.items()),
    )
    return {
        "grad_frames": chosen,
        "chosen_by": "memory_budget",
        "memory_budget": int(budget),
        "activation_bytes_per_frame": dict(per_frame),
    }
