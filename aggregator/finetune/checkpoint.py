"""The fine-tuning loop's checkpoint: read safely (:func:`load_checkpoint`), the random states it
carries (:func:`rng_state`, :func:`set_rng_state`), and what a resumed run must share with it
(:func:`resume_key`, :func:`differences`)."""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.rundir import finite

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU moved it there
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path: Path, *, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`aggregator.finetune.loop.finetune` without running
    code from the file.

    Everything in it (tensors, the optimiser's and scheduler's state dicts, the Python RNG state as
    a tuple of ints, the history as plain numbers and strings) is what ``torch.load``'s
    ``weights_only`` unpickler accepts, so it is loaded with it: a crafted file that would call a
    function when unpickled is refused instead.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{str(path)!r} is not a framepool fine-tuning checkpoint that loads safely "
            f"(it holds objects other than tensors and plain values: {first}); "
            "delete it or use a new output directory"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{str(path)!r} is not a fine-tuning checkpoint (missing {missing})")
    return ckpt


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "settings")


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def resume_key(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a job's ``config`` a resumed run must share: what the model and data are, not
    where the starting weights or the stored features came from (the checkpoint replaces them),
    nor how the backward pass is chunked (the same gradients, sized for the hardware)."""
    skip = (
        "run_id",
        "store",
        "store_streams",
        "start_extractor",
        "reuse_features",
        "backward_chunks",
    )
    return {k: v for k, v in finite(dict(config or {})).items() if k not in skip}
