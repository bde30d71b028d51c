"""The FastAPI app factory: ``create_app(settings)``, models loaded once in the lifespan."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.service.access import AccessLogMiddleware
from api.service.deps import ServiceState
from api.service.inference import InferenceQueue
from api.service.jobs import JobTable, clean_jobs_dir
from api.service.prometheus import MetricsMiddleware, ServiceMetrics
from api.service.routes import health, jobs, limits, metrics, models, predict, similar
from api.service.routes.docs import add_offline_docs
from api.service.routes.page import add_page
from api.service.served_runs import Registry, WorkerContext, load_registry, make_worker_context
from api.service.settings import Settings
from api.service.threads import ThreadPlan, plan_threads, use_opencv_threads, use_torch_threads
from api.service.uploads import UploadBudget, make_upload_dir

log = logging.getLogger(__name__)


def _load(
    settings: Settings, service_metrics: ServiceMetrics
) -> tuple[Registry, list[WorkerContext], ThreadPlan]:
    batcher = settings.batch_max_frames > 0
    threads = plan_threads(settings.workers, batcher=batcher, torch_threads=settings.torch_threads)
    use_opencv_threads(threads.opencv)
    registry = load_registry(settings.runs, settings.store, settings.device)
    context = make_worker_context(registry, settings.device)
    if batcher:
        context.add_batchers(
            max_frames=settings.batch_max_frames,
            max_wait_s=settings.batch_max_wait_s,
            workers=settings.workers,  # a running job's frames join whichever pass is next
            on_start=partial(use_torch_threads, threads.batcher),
            on_pass=service_metrics.batch_pass,
        )
    log.info(
        "torch threads: %d per worker, %s; OpenCV threads: %d",
        threads.worker,
        f"{threads.batcher} per batcher pass" if batcher else "no batcher",
        threads.opencv,
    )
    contexts = [context] * settings.workers  # extractors are thread-safe and shared
    return registry, contexts, threads


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    service_metrics: ServiceMetrics = app.state.metrics
    registry, contexts, threads = await anyio.to_thread.run_sync(_load, settings, service_metrics)
    worker_start = partial(use_torch_threads, threads.worker)
    if settings.upload_dir is None:
        upload_dir, owned = make_upload_dir(), True
    else:
        upload_dir, owned = settings.upload_dir, False
        upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    queue = InferenceQueue(
        contexts,
        settings.queue_size,
        on_change=service_metrics.queue_changed,
        on_start=worker_start,
    )
    if settings.jobs_dir is None:
        jobs_dir, jobs_owned = make_upload_dir(), True
    else:
        jobs_dir, jobs_owned = settings.jobs_dir, False
        jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        clean_jobs_dir(jobs_dir)  # what a service that did not stop cleanly left
    job_queue = InferenceQueue(
        [contexts[0]] * settings.jobs_workers,
        settings.jobs_max,
        name="jobs",
        on_start=worker_start,
    )
    job_table = JobTable(max_active=settings.jobs_max, result_ttl_s=settings.jobs_result_ttl_s)
    app.state.service = ServiceState(
        settings=settings,
        registry=registry,
        queue=queue,
        upload_dir=upload_dir,
        metrics=service_metrics,
        uploads=UploadBudget(settings.upload_budget_bytes, settings.retry_after_s),
        context=contexts[0],
        jobs=job_table,
        job_queue=job_queue,
        jobs_dir=jobs_dir,
        job_uploads=UploadBudget(settings.jobs_budget_bytes, settings.retry_after_s),
    )
    log.info(
        "serving %d run(s) (%s) with %d worker(s), queue %d, %d jobs worker(s)",
        len(registry.runs),
        ", ".join(registry.runs),
        settings.workers,
        settings.queue_size,
        settings.jobs_workers,
    )
    try:
        yield
    finally:
        app.state.service = None
        job_table.cancel_all("the service is shutting down")
        await anyio.to_thread.run_sync(queue.close)
        await anyio.to_thread.run_sync(job_queue.close)
        contexts[0].close()
        if owned:
            shutil.rmtree(upload_dir, ignore_errors=True)
        if jobs_owned:
            shutil.rmtree(jobs_dir, ignore_errors=True)
        else:
            clean_jobs_dir(jobs_dir)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Invalid parameters answer 422 with one readable ``detail`` string, like every error."""
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    )
    return JSONResponse({"detail": f"invalid request: {detail}"}, status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for ``settings`` (default: from ``FRAMEPOOL_*`` environment variables).

    Runs load when the app starts (the lifespan), so use it under uvicorn or as a context
    manager (``with TestClient(create_app(s)) as client``).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="framepool",
        summary="Video classification and similar-video search with temporal pooling heads.",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # served from local assets below
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.service = None
    for module in (predict, similar, jobs, models, limits, health, metrics):
        app.include_router(module.router)
    add_offline_docs(app)
    add_page(app)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _describe_loaded_models(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(AllowHeaderMiddleware)
    app.add_middleware(AccessLogMiddleware)  # outermost: sees every answer, even a 500
    return app


class AllowHeaderMiddleware:
    """A 405 lists every method its path answers in ``Allow`` (as the schema documents them):
    Starlette lists only those of the first route that matched the path (``GET`` and ``POST
    /v1/similar`` are two routes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                paths = scope["app"].openapi().get("paths", {})
                methods = sorted(m.upper() for m in _operations(paths, scope.get("path", "")))
                if methods:
                    headers = [(k, v) for k, v in message["headers"] if k.lower() != b"allow"]
                    headers.append((b"allow", ", ".join(methods).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_allow)


def _operations(paths: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema's operations on ``path``, matching templates such as ``/v1/jobs/{job_id}``."""
    if path in paths:
        return dict(paths[path])
    for template, ops in paths.items():
        if "{" in template:
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            if re.fullmatch(pattern, path):
                return dict(ops)
    return {}


def _describe_loaded_models(app: FastAPI) -> None:
    """Once the runs are loaded, the schema lists the values ``model`` may take (the run ids,
    and the directory names and heads that name one run), so that the schema says what the
    service accepts (any other name is a 404, an ambiguous one a 422)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        state = getattr(app.state, "service", None)
        if state is None:
            return schema
        ids = state.registry.names()
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                for param in op.get("parameters", []):
                    if param.get("name") == "model" and param.get("in") == "query":
                        param["schema"] = _enum_of(param.get("schema", {}), ids)
                for content in op.get("requestBody", {}).get("content", {}).values():
                    props = content.get("schema", {}).get("properties", {})
                    if "model" in props:
                        props["model"] = _enum_of(props["model"], ids)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _enum_of(schema: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    keep = {k: v for k, v in schema.items() if k in ("title", "description")}
    return {**keep, "type": "string", "enum": ids}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("framepool")
    except Exception:  # pragma: no cover - source tree not installed
        return "0+unknown"
