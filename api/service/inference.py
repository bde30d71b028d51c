"""A bounded job queue with a fixed pool of worker threads for CPU-heavy inference.

Decoding, feature extraction and the head run in worker threads, never on the event loop. At most
``workers + maxsize`` jobs are in the system (running or waiting); one more is refused at once
with :class:`QueueFull` (the service answers 503 with Retry-After) instead of piling up without
bound, so an answered request never waits behind more than ``maxsize`` others. Each worker is
handed a context (the service's: the feature extractors, which are safe to share between threads).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

C = TypeVar("C")
T = TypeVar("T")


class QueueFull(Exception):
    """Every worker is busy and the waiting line is full."""


class QueueClosed(Exception):
    """The queue is shutting down and takes no more jobs."""


@dataclass
class _Job(Generic[C]):
    fn: Callable[[C], Any]
    future: Future[Any]


class InferenceQueue(Generic[C]):
    """``len(contexts)`` worker threads (one per context); at most ``maxsize`` jobs wait for one.

    ``submit(fn)`` returns a :class:`concurrent.futures.Future` resolved with ``fn(context)`` run in
    a worker thread. A future cancelled while its job still waits (its client went away) is
    skipped. ``on_change`` is called with ``(waiting, running)`` whenever either changes;
    ``on_start`` runs first in every worker thread (its torch threads: :mod:`api.service.threads`).
    """

    def __init__(
        self,
        contexts: Sequence[C],
        maxsize: int,
        *,
        name: str = "inference",
        on_change: Callable[[int, int], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        if not contexts:
            raise ValueError("an inference queue needs at least one worker context")
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize!r}")
        self.maxsize = maxsize
        # unbounded underneath; the bound is enforced on ``_pending`` (jobs submitted and not yet
        # finished) so that shutdown sentinels never block behind waiting jobs
        self._queue: queue.Queue[_Job[C] | None] = queue.Queue()
        self._pending = 0
        self._on_change = on_change
        self._on_start = on_start
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(ctx,), name=f"{name}-{i}", daemon=True)
            for i, ctx in enumerate(contexts)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ state
    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._pending - self._running

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def capacity(self) -> int:
        """Jobs the queue holds at most: one running per worker plus ``maxsize`` waiting."""
        return self.workers + self.maxsize

    def alive(self) -> bool:
        return not self._closed and all(t.is_alive() for t in self._threads)

    def full(self) -> bool:
        """True when a job submitted now would be refused (no free worker, no free slot)."""
        with self._lock:
            return self._pending >= self.capacity

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.waiting, self.running)

    # ------------------------------------------------------------------ jobs
    def submit(self, fn: Callable[[C], T]) -> Future[T]:
        """Queue ``fn``; raise :class:`QueueFull` at once when no slot is free."""
        if self._closed:
            raise QueueClosed("the inference queue is shutting down")
        fut: Future[T] = Future()
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(
                    f"{self.workers} worker(s) busy and {self.maxsize} request(s) waiting"
                )
            self._pending += 1
            self._queue.put_nowait(_Job(fn, fut))
        self._changed()
        return fut

    def _work(self, ctx: C) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            try:
                if not job.future.set_running_or_notify_cancel():
                    with self._lock:
                        self._pending -= 1
                    continue  # cancelled while waiting
                with self._lock:
                    self._running += 1
                self._changed()
                try:
                    result = job.fn(ctx)
                except BaseException as exc:
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(result)
                finally:
                    with self._lock:
                        self._running -= 1
                        self._pending -= 1
            finally:
                self._queue.task_done()
                self._changed()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs, cancel waiting ones, and stop the workers after their current job."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                with self._lock:
                    self._pending -= 1
                job.future.cancel()
            self._queue.task_done()
        for _ in self._threads:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
            if t.is_alive():
                log.warning("inference worker %s still busy at shutdown", t.name)
        self._changed()
