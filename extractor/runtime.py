"""Where and how a computation runs: device, precision, seeds and CPU threads.

The one home of these choices for the feature extractor, every trainer and the service, so that
``auto`` means the same thing everywhere. Precision has one vocabulary, the one the command line
shows: ``auto``, ``fp32``, ``bf16`` (the older ``float32`` and ``bfloat16`` are still read, as
recorded configurations spell them). torch and NumPy are imported on first use, so that a
config can check a precision without loading them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
OLD_PRECISIONS: dict[str, Precision] = {"float32": "fp32", "bfloat16": "bf16"}
DTYPE_NAMES: dict[Precision, str] = {"fp32": "float32", "bf16": "bfloat16"}  # torch's names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` under torchrun: ``cuda:$LOCAL_RANK``
    (modulo the visible GPUs); ``cuda`` without a GPU is an error."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        rank = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{rank % max(torch.cuda.device_count(), 1)}"
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 matmuls: CUDA with bf16, or a CPU with AVX512-BF16/AMX (oneDNN)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def parse_precision(precision: str) -> str:
    """``auto``, ``fp32`` or ``bf16`` (``float32``/``bfloat16`` read as their short names)."""
    name = OLD_PRECISIONS.get(precision, precision)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return name


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` -> ``bf16`` where bfloat16 is native on ``device``, else ``fp32``."""
    name = parse_precision(precision)
    if name == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return "bf16" if name == "bf16" else "fp32"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's random streams."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))  # noqa: NPY002 - for code that uses the global state
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global random streams' state (Python, NumPy, torch, and CUDA when available)."""
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global state is what is saved
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def seeded_run(seed: int, threads: int | None = None) -> Iterator[None]:
    """Run the body seeded with ``seed`` on ``threads`` torch CPU threads (None: as they are),
    then give the caller back its thread count and random streams as they were."""
    import torch

    old_threads = torch.get_num_threads()
    old_rng = rng_state()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        seed_everything(seed)
        yield
    finally:
        torch.set_num_threads(old_threads)
        set_rng_state(old_rng)
