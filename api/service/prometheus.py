"""Prometheus metrics of one app: requests and latency per route, queue depth, in flight, and
the batcher's passes (frames and uploads per forward pass, seconds an upload's frames waited).

Each app has its own ``CollectorRegistry`` so that several apps (tests) never share counters.
Routes are labelled by their path template (``/v1/predict``), never by the raw URL, so that
arbitrary paths cannot blow up the number of series.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.service.batching import Pass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
PASS_FRAME_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
PASS_UPLOAD_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "framepool_requests",
            "HTTP requests answered, by route, method and status code",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "framepool_request_duration_seconds",
            "HTTP request latency, by route",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "framepool_requests_in_flight",
            "HTTP requests being answered now",
            registry=self.registry,
        )
        self.queue_waiting = Gauge(
            "framepool_queue_depth",
            "inference jobs waiting for a worker",
            registry=self.registry,
        )
        self.queue_running = Gauge(
            "framepool_inference_running",
            "inference jobs running in a worker",
            registry=self.registry,
        )
        self.rejected = Counter(
            "framepool_rejected",
            "requests refused with 503 because the inference queue was full",
            registry=self.registry,
        )
        self.stage = Histogram(
            "framepool_stage_duration_seconds",
            "seconds per stage of an inference request",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.batch_frames = Histogram(
            "framepool_batch_pass_frames",
            "frames per forward pass of the batcher (all uploads of the pass together)",
            buckets=PASS_FRAME_BUCKETS,
            registry=self.registry,
        )
        self.batch_uploads = Histogram(
            "framepool_batch_pass_uploads",
            "uploads (workers' batches) whose frames shared one forward pass of the batcher",
            buckets=PASS_UPLOAD_BUCKETS,
            registry=self.registry,
        )
        self.batch_wait = Histogram(
            "framepool_batch_wait_seconds",
            "seconds a worker's frames waited in the batcher before their forward pass began",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )

    def batch_pass(self, done: Pass) -> None:
        """Record one forward pass of a batcher (its ``on_pass``)."""
        self.batch_frames.observe(done.frames)
        self.batch_uploads.observe(done.batches)
        for wait in done.waits:
            self.batch_wait.observe(wait)

    def queue_changed(self, waiting: int, running: int) -> None:
        self.queue_waiting.set(waiting)
        self.queue_running.set(running)


def route_label(scope: Scope) -> str:
    """The matched route's path template, or ``"unmatched"``.

    FastAPI's own routes record themselves in the scope; Starlette's plain routes and mounts
    (``/openapi.json``, the docs' static assets under their mount path) record only their
    endpoint, which is looked up among the app's routes.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for candidate in getattr(scope.get("app"), "routes", ()):
            if endpoint in (getattr(candidate, "endpoint", None), getattr(candidate, "app", None)):
                path = getattr(candidate, "path", None)
                if isinstance(path, str):
                    return path or "/"
    return "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: count and time every HTTP request (streaming-safe)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = route_label(scope)
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
