"""A batcher in front of a model: the frames of concurrent uploads in one forward pass.

Each inference worker decodes its own upload and prepares its frames; when it has a batch of
frames to embed it hands them to the model's :class:`FrameBatcher` and waits. The batcher's
thread gathers what the workers hand in and runs them through the model together, then gives
each worker the rows of its own frames, in its own order. A pass starts as soon as one of these
holds:

- ``max_frames`` frames are waiting (the largest batch; one upload's batch larger than that runs
  alone, never split),
- every request worker is waiting (nobody could join the pass: no reason to wait; a job
  worker's frames join whichever pass comes next),
- ``max_wait_s`` has passed since the oldest waiting batch came in.

A model's output for one frame does not depend on the other frames of its batch (the inference
copies have no batch statistics: BatchNorm is folded), so an answer is the one the upload gets
alone, up to the floating point of a larger matrix product.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Embed = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and runs no more passes."""


@dataclass
class _Item:
    batch: Mapping[str, np.ndarray]
    rows: int
    arrived: float
    future: Future[dict[str, np.ndarray]] = field(default_factory=Future)


@dataclass(frozen=True)
class Pass:
    """One forward pass: how many workers' batches it took, how many frames in all, and how
    long each batch waited in the batcher before the pass started (seconds, in arrival order)."""

    batches: int
    frames: int
    waits: tuple[float, ...] = field(default=(), compare=False)


class FrameBatcher:
    """Runs ``embed`` (``{stream: [n, ...]} -> {stream: [n, d]}``) on the frames of concurrent
    callers at once; :meth:`embed` is what each caller uses instead. ``workers``: how many
    callers there are (a pass waits no longer once that many are waiting).

    ``on_start`` runs first in the batcher's thread (the service gives that thread the torch
    intra-op threads: :mod:`api.service.threads`); ``on_pass`` is called with every
    :class:`Pass` that succeeded (metrics). ``passes`` keeps the last 1,000 passes, for tests
    and logs.
    """

    def __init__(
        self,
        embed: Embed,
        *,
        max_frames: int,
        max_wait_s: float,
        workers: int,
        name: str = "batcher",
        on_start: Callable[[], None] | None = None,
        on_pass: Callable[[Pass], None] | None = None,
    ) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self._embed = embed
        self.max_frames = max_frames
        self.max_wait_s = max_wait_s
        self.workers = workers
        self._on_start = on_start
        self._on_pass = on_pass
        self.passes: deque[Pass] = deque(maxlen=1000)
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def embed(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's output for ``batch``, computed in a pass shared with other callers."""
        rows = {len(x) for x in batch.values()}
        if len(rows) != 1:
            raise ValueError(f"every stream of a batch needs the same number of rows, got {rows}")
        item = _Item(batch=batch, rows=rows.pop(), arrived=time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is shutting down")
            self._items.append(item)
            self._cond.notify_all()
        return item.future.result()

    def close(self, timeout: float | None = 30.0) -> None:
        """Run no more passes; callers still waiting get :class:`BatcherClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the batcher's thread
    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            with self._cond:
                taken = self._gather()
            if taken is None:
                return
            self._pass(taken)

    def _gather(self) -> list[_Item] | None:
        """Wait for a pass to be due and take its items (None once closed). Holds the lock."""
        while not self._items and not self._closed:
            self._cond.wait()
        if self._closed:
            for item in self._items:
                item.future.set_exception(BatcherClosed("the batcher is shutting down"))
            self._items.clear()
            return None
        deadline = self._items[0].arrived + self.max_wait_s
        while (
            sum(i.rows for i in self._items) < self.max_frames
            and len(self._items) < self.workers
            and not self._closed
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        taken = [self._items.popleft()]
        frames = taken[0].rows
        while self._items and frames + self._items[0].rows <= self.max_frames:
            frames += self._items[0].rows
            taken.append(self._items.popleft())
        return taken

    def _pass(self, taken: list[_Item]) -> None:
        streams = list(taken[0].batch)
        started = time.monotonic()
        try:
            batch = {s: np.concatenate([np.asarray(i.batch[s]) for i in taken]) for s in streams}
            out = self._embed(batch)
        except BaseException as exc:  # every caller of the pass gets the error
            for item in taken:
                item.future.set_exception(exc)
            return
        done = Pass(
            batches=len(taken),
            frames=sum(i.rows for i in taken),
            waits=tuple(max(0.0, started - i.arrived) for i in taken),
        )
        self.passes.append(done)
        start = 0
        for item in taken:
            stop = start + item.rows
            item.future.set_result({s: np.asarray(f)[start:stop] for s, f in out.items()})
            start = stop
        if self._on_pass is not None:
            try:
                self._on_pass(done)
            except Exception:  # a metric must never fail the pass
                log.exception("recording a batcher pass failed")
