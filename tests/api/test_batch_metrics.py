"""The batcher's metrics, its command-line flags, and how the service's threads share the cores."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import generate_latest

from api.cli import UsageError, build_parser
from api.cli.serve_cmd import settings_from_args
from api.service.batching import FrameBatcher, Pass
from api.service.prometheus import ServiceMetrics
from api.service.threads import ThreadPlan, plan_threads


def doubled(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {s: 2 * x.reshape(len(x), -1).sum(1, keepdims=True) for s, x in batch.items()}


def sample(metrics: ServiceMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, f"{name} not exported"
    return value


def test_a_pass_records_its_frames_uploads_and_waits() -> None:
    metrics = ServiceMetrics()
    started: list[bool] = []
    batcher = FrameBatcher(
        doubled,
        max_frames=100,
        max_wait_s=30,
        workers=3,
        on_start=lambda: started.append(True),
        on_pass=metrics.batch_pass,
    )
    try:
        batches = [{"a": np.ones((n, 2), dtype=np.float32)} for n in (2, 3, 7)]
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(batcher.embed, batches))
    finally:
        batcher.close()
    assert started == [True]
    (done,) = batcher.passes
    assert done == Pass(batches=3, frames=12) and len(done.waits) == 3
    assert all(w >= 0 for w in done.waits)
    assert sample(metrics, "framepool_batch_pass_frames_count") == 1
    assert sample(metrics, "framepool_batch_pass_frames_sum") == 12
    assert sample(metrics, "framepool_batch_pass_uploads_sum") == 3
    assert sample(metrics, "framepool_batch_wait_seconds_count") == 3
    assert sample(metrics, "framepool_batch_wait_seconds_sum") == pytest.approx(sum(done.waits))
    text = generate_latest(metrics.registry).decode()
    assert 'framepool_batch_pass_frames_bucket{le="16.0"} 1.0' in text


def test_a_failing_metric_does_not_fail_the_pass() -> None:
    def broken(done: Pass) -> None:
        raise RuntimeError("metric down")

    batcher = FrameBatcher(doubled, max_frames=4, max_wait_s=0, workers=1, on_pass=broken)
    try:
        out = batcher.embed({"a": np.ones((2, 1), dtype=np.float32)})
    finally:
        batcher.close()
    assert out["a"].tolist() == [[2.0], [2.0]]


def _serve_args(tmp_path: object, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--run", str(tmp_path), *extra])


def test_serve_flags_set_the_batcher(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAMEPOOL_BATCH_MAX_FRAMES", raising=False)
    monkeypatch.delenv("FRAMEPOOL_BATCH_MAX_WAIT_S", raising=False)
    default = settings_from_args(_serve_args(tmp_path))
    assert (default.batch_max_frames, default.batch_max_wait_s) == (64, 0.01)
    args = _serve_args(tmp_path, "--batch-max-frames", "0", "--batch-max-wait", "0.05")
    settings = settings_from_args(args)
    assert (settings.batch_max_frames, settings.batch_max_wait_s) == (0, 0.05)
    monkeypatch.setenv("FRAMEPOOL_BATCH_MAX_FRAMES", "32")  # a flag left out: the environment
    assert settings_from_args(_serve_args(tmp_path)).batch_max_frames == 32
    assert (
        settings_from_args(_serve_args(tmp_path, "--batch-max-frames", "8")).batch_max_frames == 8
    )


def test_bad_batcher_flags_are_usage_errors_that_name_the_flag(tmp_path: object) -> None:
    with pytest.raises(UsageError, match="--batch-max-wait: "):
        settings_from_args(_serve_args(tmp_path, "--batch-max-wait", "-1"))
    with pytest.raises(UsageError, match="--batch-max-frames: "):
        settings_from_args(_serve_args(tmp_path, "--batch-max-frames", "-3"))


def test_the_batcher_gets_the_intra_op_threads_and_workers_one() -> None:
    assert plan_threads(8, batcher=True, cores=2) == ThreadPlan(worker=1, batcher=2, opencv=1)
    assert plan_threads(8, batcher=True, torch_threads=1, cores=2).batcher == 1
    # without a batcher every worker runs its own passes on its share of the cores
    assert plan_threads(8, batcher=False, cores=2) == ThreadPlan(worker=1, batcher=0, opencv=1)
    assert plan_threads(2, batcher=False, cores=16) == ThreadPlan(worker=8, batcher=0, opencv=8)
    assert plan_threads(1, batcher=False, torch_threads=3, cores=16).worker == 3
    with pytest.raises(ValueError, match="workers must be >= 1"):
        plan_threads(0, batcher=True)
