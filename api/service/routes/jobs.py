"""``/v1/jobs``: a long video analysed in the background; create it, poll it, fetch its answer,
cancel it.

``POST /v1/jobs`` takes the upload as ``/v1/predict`` does and answers 202 at once, with the
job's URL in ``Location``; the job runs in a worker of its own pool under the jobs' limits (more
frames and pixels than a request may have, see :class:`~api.service.settings.Settings`).
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.service.deps import (
    JobDep,
    ServiceState,
    StateDep,
    frame_options,
    merge_options,
    probe_upload,
    request_limits,
    select_run,
    uploaded_file,
    video_error,
)
from api.service.inference import QueueClosed, QueueFull
from api.service.jobs import Job, JobsFull
from api.service.routes._openapi import ERRORS, upload_body
from api.service.routes.predict import prediction
from api.service.schemas import (
    ErrorResponse,
    JobError,
    JobOptions,
    JobProgress,
    JobState,
    JobStatus,
    MaxFrames,
    RunId,
    Stride,
    TopK,
)
from api.service.served_runs import (
    JobControl,
    JobStopped,
    Limits,
    LoadedRun,
    WorkerContext,
    analyse,
)
from api.service.uploads import Upload

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["jobs"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "model": ErrorResponse,
        "description": "no such job (never created, deleted, or its result expired)",
    },
    422: {"model": ErrorResponse, "description": "not a job id"},
}


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobStatus,
    responses={
        **ERRORS,
        202: {
            "description": "the job is queued; poll its URL",
            "headers": {
                "Location": {
                    "description": "the job's URL, /v1/jobs/{id}",
                    "schema": {"type": "string"},
                }
            },
        },
    },
    openapi_extra=upload_body(required=True),
    summary="Start a job for a long video",
)
async def create_job(
    request: Request,
    response: Response,
    state: StateDep,
    top_k: Annotated[TopK | None, Query()] = None,
    model: Annotated[RunId | None, Query()] = None,
    stride: Annotated[Stride | None, Query()] = None,
    max_frames: Annotated[MaxFrames | None, Query()] = None,
) -> JobStatus:
    """Upload a video as multipart field ``file``, as for ``/v1/predict``; the answer comes
    later, from ``GET /v1/jobs/{id}`` (the ``Location`` header).

    Limits are the jobs' own (``/v1/limits`` shows a request's): a job may use more frames and
    decode a longer, larger video. Too many jobs queued or running, or their uploads over their
    disk budget, answer 503 with Retry-After.
    """
    from extractor.decode import VideoError, count_packets

    t0 = time.perf_counter()
    query = JobOptions(top_k=top_k, model=model, stride=stride, max_frames=max_frames)
    if state.jobs.full():
        raise _jobs_busy(state)
    async with uploaded_file(request, state, job=True) as upload:
        assert upload.path is not None
        opts = merge_options(query, upload.fields)
        run = select_run(state, opts.model)
        request.state.model = run.run_id
        n_stride, n_max = frame_options(state, opts.stride, opts.max_frames, job=True)
        limits = request_limits(state.settings, job=True)
        await probe_upload(state, upload.path, limits)
        try:
            total = await run_in_threadpool(count_packets, upload.path)
        except VideoError as exc:
            raise video_error(upload.path, exc) from None
        if total > limits.max_decoded_frames:
            raise HTTPException(
                413,
                f"the video has {total} frames, more than this service's limit of "
                f"{limits.max_decoded_frames} frames per job",
            )
        control = JobControl(state.settings.jobs_timeout_s)
        try:
            job = state.jobs.add(run.run_id, control, total)
        except JobsFull:
            raise _jobs_busy(state) from None
        work = functools.partial(
            _work,
            state=state,
            job=job,
            run=run,
            upload=upload,
            path=upload.path,
            options=(opts.top_k, n_stride, n_max),
            limits=limits,
            started=t0,
        )
        try:
            future = state.job_queue.submit(work)
        except (QueueFull, QueueClosed):
            state.jobs.remove(job.id)
            raise _jobs_busy(state) from None
        upload.hold_until(future)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_status(state, job)


@router.get(
    "/jobs/{job_id}",
    response_model=JobStatus,
    responses=NOT_FOUND,
    summary="A job's status, progress and result",
)
def get_job(state: StateDep, job: JobDep) -> JobStatus:
    """Poll until ``status`` is ``succeeded`` (``result`` holds the answer), ``failed`` or
    ``cancelled`` (``error`` says why). A finished job is kept until ``expires_at``."""
    return job_status(state, job)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobStatus,
    responses=NOT_FOUND,
    summary="Cancel a job, or forget a finished one",
)
def delete_job(state: StateDep, job: JobDep) -> JobStatus:
    """A queued job is dropped and a running one stops at its next frame; its upload is removed
    once it has. The job is forgotten (a later GET answers 404); the answer is its last status."""
    return job_status(state, state.jobs.remove(job.id) or job)


def job_status(state: ServiceState, job: Job) -> JobStatus:
    """A job as the API shows it."""
    decoded = job.control.frames
    if job.state is JobState.succeeded and job.result is not None:
        decoded = job.result.frames.n_frames
    total = job.frames_total
    fraction = None
    if job.state is JobState.succeeded:
        fraction = 1.0
    elif total:
        fraction = min(1.0, decoded / total)
    return JobStatus(
        id=job.id,
        status=job.state,
        model=job.model,
        created_at=datetime.fromtimestamp(job.created_at, tz=UTC),
        started_at=_time(job.started_at),
        finished_at=_time(job.finished_at),
        expires_at=_time(state.jobs.expires_at(job)),
        progress=JobProgress(frames_decoded=decoded, frames_total=total, fraction=fraction),
        result=job.result,
        error=None
        if job.error is None
        else JobError(status_code=job.error_status or 500, detail=job.error),
    )


def _work(
    ctx: WorkerContext,
    *,
    state: ServiceState,
    job: Job,
    run: LoadedRun,
    upload: Upload,
    path: FilePath,
    options: tuple[int | None, int, int | None],
    limits: Limits,
    started: float,
) -> None:
    """Run one job in a jobs worker and record how it ended."""
    from extractor.decode import VideoError

    top_k, stride, max_frames = options
    state.jobs.started(job)
    try:
        result = analyse(
            ctx,
            run,
            path,
            stride=stride,
            max_frames=max_frames,
            proba=True,
            embedding=False,
            submitted_at=started,
            limits=limits,
            control=job.control,
        )
        answer = prediction(
            state,
            run,
            result,
            upload,
            top_k=top_k,
            stride=stride,
            max_frames=max_frames,
            started=started,
            observe=False,
        )
    except JobStopped as exc:  # a DELETE has already marked it cancelled
        state.jobs.finish(job, JobState.failed, error=(503, str(exc)))
    except VideoError as exc:
        http = video_error(path, exc)
        state.jobs.finish(job, JobState.failed, error=(http.status_code, str(http.detail)))
    except Exception as exc:
        log.exception("job %s failed", job.id)
        state.jobs.finish(
            job, JobState.failed, error=(500, f"internal error ({type(exc).__name__})")
        )
    else:
        state.jobs.finish(job, JobState.succeeded, result=answer)


def _jobs_busy(state: ServiceState) -> HTTPException:
    state.metrics.rejected.inc()
    return HTTPException(
        503,
        f"{state.jobs.max_active} job(s) queued or running, as many as this service takes; "
        "retry later",
        headers={"Retry-After": str(state.settings.retry_after_s)},
    )


def _time(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)
