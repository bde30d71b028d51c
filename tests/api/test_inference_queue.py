"""The bounded inference queue: results, refusal when full, cancellation, shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from api.service.inference import InferenceQueue, QueueClosed, QueueFull


def test_each_job_gets_its_own_result_and_context() -> None:
    seen: list[tuple[str, int]] = []
    q = InferenceQueue(["w0", "w1"], maxsize=100)
    try:
        futs = [q.submit(lambda ctx, i=i: (seen.append((ctx, i)), i * i)[1]) for i in range(50)]
        assert [f.result(timeout=10) for f in futs] == [i * i for i in range(50)]
        assert {c for c, _ in seen} <= {"w0", "w1"}
        boom = q.submit(lambda ctx: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            boom.result(timeout=10)
        assert q.submit(lambda ctx: "still alive").result(timeout=10) == "still alive"
    finally:
        q.close()


def test_full_queue_refuses_at_once_and_frees_up() -> None:
    gate = threading.Event()
    started = threading.Event()
    changes: list[tuple[int, int]] = []

    def blocked(ctx: object) -> str:
        started.set()
        gate.wait(10)
        return "done"

    q = InferenceQueue([None], maxsize=1, on_change=lambda w, r: changes.append((w, r)))
    try:
        running = q.submit(blocked)
        assert started.wait(10)
        waiting = q.submit(lambda ctx: "second")
        assert q.full() and q.waiting == 1 and q.running == 1
        with pytest.raises(QueueFull, match="1 worker"):
            q.submit(lambda ctx: "third")
        gate.set()
        assert running.result(timeout=10) == "done"
        assert waiting.result(timeout=10) == "second"
        assert not q.full()
        assert q.submit(lambda ctx: "fourth").result(timeout=10) == "fourth"
        assert (1, 1) in changes and changes[-1] == (0, 0)
    finally:
        gate.set()
        q.close()


def test_cancelled_waiting_job_is_skipped_and_close_cancels() -> None:
    gate = threading.Event()
    ran: list[str] = []
    q = InferenceQueue([None], maxsize=5)
    q.submit(lambda ctx: gate.wait(10))
    skipped = q.submit(lambda ctx: ran.append("skipped"))
    assert skipped.cancel()
    left = q.submit(lambda ctx: ran.append("left"))
    threading.Timer(0.2, gate.set).start()
    q.close()
    assert not q.alive()
    assert "skipped" not in ran
    if left.cancelled():
        with pytest.raises(CancelledError):
            left.result()
    with pytest.raises(QueueClosed):
        q.submit(lambda ctx: None)
    gate.set()


def test_no_waiting_room_means_one_job_per_worker() -> None:
    gate = threading.Event()
    q = InferenceQueue([None, None], maxsize=0)
    try:
        a = q.submit(lambda ctx: gate.wait(10))
        b = q.submit(lambda ctx: gate.wait(10))
        assert q.full() and q.capacity == 2
        with pytest.raises(QueueFull):
            q.submit(lambda ctx: None)
        gate.set()
        assert a.result(timeout=10) and b.result(timeout=10)
        assert q.submit(lambda ctx: "free again").result(timeout=10) == "free again"
    finally:
        gate.set()
        q.close()
