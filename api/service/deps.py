"""Dependencies shared by the routers: the service state, model selection, uploads, the queue.

This module and the routers are the only places that turn errors into HTTP responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from aggregator.similarity import SimilarityIndex
from api.service.inference import InferenceQueue, QueueClosed, QueueFull
from api.service.jobs import Job, JobTable
from api.service.prometheus import ServiceMetrics
from api.service.served_runs import (
    AmbiguousModel,
    Analysis,
    JobControl,
    JobStopped,
    Limits,
    LoadedRun,
    Registry,
    WorkerContext,
    analyse,
)
from api.service.settings import Settings
from api.service.uploads import (
    CLIENT_CLOSED,
    Upload,
    UploadBudget,
    UploadError,
    receive_upload,
    sniff_container,
)

if TYPE_CHECKING:
    from extractor.decode import VideoInfo

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass
class ServiceState:
    """What the lifespan handler loads once and every request reads."""

    settings: Settings
    registry: Registry
    queue: InferenceQueue[WorkerContext]
    upload_dir: Path
    metrics: ServiceMetrics
    uploads: UploadBudget
    context: WorkerContext  # what the workers share: the extractors and their batchers
    jobs: JobTable
    job_queue: InferenceQueue[WorkerContext]
    jobs_dir: Path
    job_uploads: UploadBudget


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise HTTPException(503, "the service is starting", headers={"Retry-After": "1"})
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def select_run(state: ServiceState, model: str | None) -> LoadedRun:
    """The run ``?model=`` names (a run id, a run directory's name, or a head naming one run);
    404 when none does, 422 listing the candidates when several do."""
    try:
        return state.registry.get(model)
    except AmbiguousModel as exc:
        raise HTTPException(422, str(exc)) from None
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from None


def require_index(run: LoadedRun, asked: str = "") -> SimilarityIndex:
    """The run's similarity index; 404 naming how to build it when the run has none."""
    if run.index is None:
        what = f" for {asked}" if asked else ""
        raise HTTPException(
            404,
            f"model {run.run_id!r} has no similarity index{what}; build it with "
            "'framepool index build --run DIR --store PATH'",
        )
    return run.index


def _busy(state: ServiceState) -> HTTPException:
    state.metrics.rejected.inc()
    return HTTPException(
        503,
        f"busy: {state.queue.workers} worker(s) running and {state.queue.maxsize} request(s) "
        "waiting; retry later",
        headers={"Retry-After": str(state.settings.retry_after_s)},
    )


def refuse_if_busy(state: ServiceState) -> None:
    """Answer 503 before reading an upload when a job could not be queued now anyway."""
    if state.queue.full():
        raise _busy(state)


@contextlib.asynccontextmanager
async def uploaded_file(
    request: Request, state: ServiceState, *, require_file: bool = True, job: bool = False
) -> AsyncIterator[Upload]:
    """The request's multipart upload in a private temporary file, removed afterwards (``job``:
    in the jobs folder, within the jobs' size limit and disk budget)."""
    settings = state.settings
    try:
        async with receive_upload(
            request,
            state.jobs_dir if job else state.upload_dir,
            max_bytes=settings.jobs_max_upload_bytes if job else settings.max_upload_bytes,
            require_file=require_file,
            budget=state.job_uploads if job else state.uploads,
            idle_timeout_s=settings.upload_idle_timeout_s,
            timeout_s=settings.upload_timeout_s,
        ) as upload:
            yield upload
    except UploadError as exc:
        if exc.status_code == 503:
            state.metrics.rejected.inc()
        raise HTTPException(exc.status_code, exc.reason, headers=exc.headers) from None


def merge_options(query: M, fields: dict[str, str]) -> M:
    """Options from the query string and from form fields; a form field wins over the same
    option in the query string (the schema allows both)."""
    model = type(query)
    given = query.model_dump(exclude_none=True)
    unknown = sorted(set(fields) - set(model.model_fields) - {"file"})
    if unknown:
        raise HTTPException(422, f"unknown form field(s) {unknown}")
    merged: dict[str, Any] = {**given, **{k: v for k, v in fields.items() if k != "file"}}
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise HTTPException(422, f"invalid option(s): {errors}") from None


@contextlib.asynccontextmanager
async def upload_and_options(
    request: Request, state: ServiceState, query: M
) -> AsyncIterator[tuple[Upload, M]]:
    """A request's upload (refused at once, 503, when the service is busy) and its options:
    ``query``'s, with the upload's form fields over them (:func:`merge_options`)."""
    refuse_if_busy(state)
    async with uploaded_file(request, state) as upload:
        yield upload, merge_options(query, upload.fields)


def frame_options(
    state: ServiceState, stride: int | None, max_frames: int | None, *, job: bool = False
) -> tuple[int, int | None]:
    """The stride and frame count a request uses, within the service's (or the jobs') limit."""
    settings = state.settings
    s = settings.default_stride if stride is None else stride
    m = settings.default_max_frames if max_frames is None else max_frames
    limit = settings.jobs_max_frames_limit if job else settings.max_frames_limit
    if limit is not None:
        if m is not None and m > limit:
            raise HTTPException(422, f"max_frames={m} exceeds this service's limit of {limit}")
        m = limit if m is None else m
    return s, m


def request_limits(settings: Settings, *, job: bool = False) -> Limits:
    """The frames and pixels a video may have: a request's, or a job's (larger by default)."""
    if job:
        return Limits(settings.jobs_max_decoded_frames, settings.jobs_max_frame_pixels)
    return Limits(settings.max_decoded_frames, settings.max_frame_pixels)


async def probe_upload(state: ServiceState, path: Path, limits: Limits | None = None) -> VideoInfo:
    """Check that the upload is a video with a video stream, and not larger than ``limits``
    (default: a request's) allow by what its container declares, before queueing it."""
    from extractor.decode import VideoError, probe

    try:
        info = await run_in_threadpool(probe, path)
    except VideoError as exc:
        raise video_error(path, exc) from None
    limits = limits or request_limits(state.settings)
    pixels = info.width * info.height
    if pixels > limits.max_frame_pixels:
        raise HTTPException(
            413,
            f"frames of {info.width}x{info.height} = {pixels} pixels are larger than this "
            f"service's limit of {limits.max_frame_pixels} pixels per frame",
        )
    if info.n_frames_hint is not None and info.n_frames_hint > limits.max_decoded_frames:
        raise HTTPException(
            413,
            f"the video declares {info.n_frames_hint} frames, more than this service's limit "
            f"of {limits.max_decoded_frames} frames per video",
        )
    return info


def video_error(path: Path, exc: Exception) -> HTTPException:
    """415 for something that is not a video container, 413 for a video over the limits, 422
    for a video that will not decode."""
    from extractor.decode import UnsupportedFormat, VideoTooLarge

    container = sniff_container(path)
    # the decoder names the file; the client should not see where the service keeps uploads
    reason = (str(exc) or type(exc).__name__).replace(repr(str(path)), "upload")
    reason = reason.replace(str(path), "upload")
    if isinstance(exc, VideoTooLarge):
        return HTTPException(413, f"video larger than this service's limits: {reason}")
    if isinstance(exc, UnsupportedFormat):
        return HTTPException(415, f"not a supported video: {reason}")
    if container is None:
        return HTTPException(415, f"not a supported video: {reason}")
    if "no video stream" in reason.lower():
        return HTTPException(415, f"{container} file without a video stream: {reason}")
    return HTTPException(422, f"{container} file that cannot be decoded: {reason}")


async def client_gone(request: Request) -> None:
    """Return when the client closes the connection (call once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_job(
    state: ServiceState,
    upload: Upload | None,
    fn: Callable[[WorkerContext], T],
    *,
    request: Request | None = None,
    control: JobControl | None = None,
) -> T:
    """Run ``fn`` in an inference worker (503 when the queue is full); keep the upload until
    the job ends, even when this request is cancelled.

    With ``request``, the client is watched while the job waits or runs: when it goes away the
    job is taken off the queue, or ``control`` is cancelled so that the running job stops at
    its next frame, and the request ends with 499.
    """
    from extractor.decode import VideoError

    try:
        future = state.queue.submit(fn)
    except QueueFull:
        raise _busy(state) from None
    except QueueClosed:
        raise HTTPException(
            503, "the service is shutting down", headers={"Retry-After": "5"}
        ) from None
    if upload is not None:
        upload.hold_until(future)
    waiter = asyncio.wrap_future(future)
    try:
        if request is not None:
            watcher = asyncio.ensure_future(client_gone(request))
            try:
                either: set[asyncio.Future[Any]] = {waiter, watcher}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            if not waiter.done():
                if control is not None:
                    control.cancel("the client went away")
                waiter.cancel()  # takes a waiting job off the queue; a running one stops itself
                log.info(
                    "client went away; its job was %s", "stopped" if future.running() else "dropped"
                )
                raise HTTPException(CLIENT_CLOSED, "the client went away")
        return await waiter
    except VideoError as exc:
        assert upload is not None and upload.path is not None
        raise video_error(upload.path, exc) from None
    except JobStopped as exc:
        raise HTTPException(
            503, str(exc), headers={"Retry-After": str(state.settings.retry_after_s)}
        ) from None


JobFactory = Callable[[Path, Limits, JobControl], Callable[[WorkerContext], T]]


async def run_upload_job(
    state: ServiceState, request: Request | None, upload: Upload, make_job: JobFactory[T]
) -> T:
    """Probe the uploaded video, then run the job that ``make_job(path, limits, control)``
    builds in an inference worker, within a request's limits and timeout (:func:`run_job`: the
    job stops when ``request``'s client goes away)."""
    assert upload.path is not None
    await probe_upload(state, upload.path)
    control = JobControl(state.settings.job_timeout_s)
    job = make_job(upload.path, request_limits(state.settings), control)
    return await run_job(state, upload, job, request=request, control=control)


async def analyse_upload(
    state: ServiceState,
    request: Request | None,
    upload: Upload,
    run: LoadedRun,
    *,
    stride: int,
    max_frames: int | None,
    proba: bool,
    embedding: bool,
) -> Analysis:
    """Probe the uploaded video, then decode, extract and apply ``run``'s head in a worker
    (``stride`` and ``max_frames`` as resolved by :func:`frame_options`), within the service's
    limits; the job stops when ``request``'s client goes away."""

    def make_job(
        path: Path, limits: Limits, control: JobControl
    ) -> Callable[[WorkerContext], Analysis]:
        return functools.partial(
            analyse,
            run=run,
            path=path,
            stride=stride,
            max_frames=max_frames,
            proba=proba,
            embedding=embedding,
            submitted_at=time.perf_counter(),
            limits=limits,
            control=control,
        )

    return await run_upload_job(state, request, upload, make_job)


JobId = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=64,
        pattern=r"^[0-9a-f]+$",
        description="the job's id, from POST /v1/jobs",
    ),
]


def existing_job(state: StateDep, job_id: JobId) -> Job:
    """The job ``job_id`` names; 404 when there is none (never created, deleted, or expired)."""
    job = state.jobs.get(job_id)
    if job is None:
        raise HTTPException(
            404, f"no job {job_id!r}: never created, deleted, or its result has expired"
        )
    return job


JobDep = Annotated[Job, Depends(existing_job)]
