"""How the service's threads share the CPU cores: torch intra-op threads and OpenCV's.

The service runs ``workers`` inference threads, each decoding an upload, computing its optical
flow (OpenCV) and cropping its frames; with the batcher on, one more thread per model runs the
forward passes of every worker's frames. Left alone, each of these threads runs every torch
operation on an OpenMP team as large as the machine (and OpenCV's flow on a pool as large): eight
workers on two cores then keep sixteen OpenMP threads that spin at barriers waiting for a peer
that is not scheduled, which costs more CPU than the work itself on a busy machine.

The rule: the parallelism comes from the workers, so a worker's own operations get
``cores // workers`` threads (at least one); the batcher's thread, the only one running the
backbones when it is on, gets the intra-op threads (``torch_threads``, default: every core) while
the workers decode with one. Torch's thread count is per thread (each thread sets its own at
start: :func:`use_torch_threads`); OpenCV's is per process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """Torch intra-op threads of each worker and of the batcher's passes (0: no batcher), and
    OpenCV's threads (the flow of every worker)."""

    worker: int
    batcher: int
    opencv: int


def plan_threads(
    workers: int, *, batcher: bool, torch_threads: int | None = None, cores: int | None = None
) -> ThreadPlan:
    """The threads of ``workers`` inference workers on ``cores`` cores (default: this process's).

    ``torch_threads`` (``--threads``) sets the threads of a forward pass: the batcher's when it is
    on, else each worker's; by default the batcher takes every core and a worker its share.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"torch_threads must be >= 1, got {torch_threads!r}")
    n = cpu_cores() if cores is None else max(1, cores)
    share = max(1, n // workers)
    if batcher:
        return ThreadPlan(worker=1, batcher=torch_threads or n, opencv=share)
    return ThreadPlan(worker=torch_threads or share, batcher=0, opencv=share)


def use_torch_threads(n: int) -> None:
    """Run this thread's torch operations on ``n`` intra-op threads (the calling thread only;
    threads started later inherit the last value set)."""
    import torch

    torch.set_num_threads(n)


def use_opencv_threads(n: int) -> None:
    """OpenCV's thread pool for the whole process (1: each call runs in its caller's thread)."""
    try:
        import cv2
    except ImportError:  # no flow backend that uses it
        return
    cv2.setNumThreads(n)
