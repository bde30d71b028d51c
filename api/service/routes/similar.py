"""``POST /v1/similar``: the nearest training videos to an upload or to an indexed video."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from aggregator.similarity import Neighbour as Hit
from api.service.deps import (
    ServiceState,
    StateDep,
    analyse_upload,
    frame_options,
    merge_options,
    refuse_if_busy,
    require_index,
    select_run,
    uploaded_file,
)
from api.service.routes._openapi import ERRORS, upload_body
from api.service.schemas import (
    FramesInfo,
    MaxFrames,
    Neighbour,
    RunId,
    SimilarOptions,
    SimilarResponse,
    Stride,
    Timings,
    TopK,
    VideoId,
)
from api.service.uploads import is_multipart

router = APIRouter(prefix="/v1", tags=["similar"])


@router.get(
    "/similar",
    response_model=SimilarResponse,
    responses={404: ERRORS[404], 422: ERRORS[422]},
    summary="Nearest training videos to an indexed video",
)
def similar_to_indexed(
    request: Request,
    state: StateDep,
    video_id: Annotated[VideoId, Query()],
    top_k: Annotated[TopK | None, Query()] = None,
    model: Annotated[RunId | None, Query()] = None,
) -> SimilarResponse:
    """The nearest indexed videos to ``video_id``, itself left out of the answer."""
    opts = SimilarOptions(video_id=video_id, top_k=top_k, model=model)
    return _by_id(request, state, opts, time.perf_counter())


@router.post(
    "/similar",
    response_model=SimilarResponse,
    responses=ERRORS,
    openapi_extra=upload_body(required=True),
    summary="Nearest training videos to an uploaded video",
)
async def similar(
    request: Request,
    state: StateDep,
    # searching by id here is kept for older clients; GET /v1/similar is the documented way
    video_id: Annotated[VideoId | None, Query(include_in_schema=False)] = None,
    top_k: Annotated[TopK | None, Query()] = None,
    model: Annotated[RunId | None, Query()] = None,
    stride: Annotated[Stride | None, Query()] = None,
    max_frames: Annotated[MaxFrames | None, Query()] = None,
) -> SimilarResponse:
    """Upload a video (multipart field ``file``): the nearest indexed videos to it.

    An uploaded copy of a training video finds itself first, at distance ~0. (A ``video_id``
    query parameter or form field, as ``GET /v1/similar`` takes, is also understood here and
    takes precedence over a file sent along.)
    """
    t0 = time.perf_counter()
    query = SimilarOptions(
        video_id=video_id, top_k=top_k, model=model, stride=stride, max_frames=max_frames
    )
    if not is_multipart(request):
        if query.video_id is None:
            raise HTTPException(
                422, "send a video as multipart field 'file', or give video_id of an indexed video"
            )
        return _by_id(request, state, query, t0)
    if query.video_id is not None:
        return _by_id(request, state, query, t0)  # a body sent along is not read
    run = select_run(state, query.model)
    require_index(run)
    refuse_if_busy(state)
    async with uploaded_file(request, state, require_file=False) as upload:
        opts = merge_options(query, upload.fields)
        if opts.video_id is not None:  # the file, if any, is not used
            return _by_id(request, state, opts, t0, upload_s=upload.seconds)
        if upload.path is None:
            raise HTTPException(422, "multipart field 'file' (the video) or video_id is missing")
        run = select_run(state, opts.model)
        request.state.model = run.run_id
        index = require_index(run)
        n_stride, n_max = frame_options(state, opts.stride, opts.max_frames)
        result = await analyse_upload(
            state,
            request,
            upload,
            run,
            stride=n_stride,
            max_frames=n_max,
            proba=False,
            embedding=True,
        )
    assert result.embedding is not None
    t_search = time.perf_counter()
    hits = index.search(result.embedding, opts.top_k or state.settings.default_top_k)
    search_s = time.perf_counter() - t_search
    return SimilarResponse(
        model=run.run_id,
        query="upload",
        neighbours=[
            Neighbour(video_id=h.video_id, label=h.label, distance=h.distance) for h in hits
        ],
        index_size=len(index),
        index_split=index.meta.get("split"),
        frames=FramesInfo(
            n_frames=result.n_frames,
            used=result.used,
            stride=n_stride,
            max_frames=n_max,
            times=result.times,
        ),
        timings=Timings(
            upload=upload.seconds,
            queue=result.queue_s,
            decode_extract=result.decode_extract_s,
            head=result.head_s,
            search=search_s,
            total=time.perf_counter() - t0,
        ),
    )


def _neighbours(hits: list[Hit]) -> list[Neighbour]:
    return [Neighbour(video_id=h.video_id, label=h.label, distance=h.distance) for h in hits]


def _by_id(
    request: Request,
    state: ServiceState,
    opts: SimilarOptions,
    t0: float,
    upload_s: float = 0.0,
) -> SimilarResponse:
    run = select_run(state, opts.model)
    request.state.model = run.run_id
    index = require_index(run)
    assert opts.video_id is not None
    if opts.video_id not in index:
        raise HTTPException(404, f"video {opts.video_id!r} is not in the index of {run.run_id!r}")
    t_search = time.perf_counter()
    hits = index.search(
        index.vector(opts.video_id),
        opts.top_k or state.settings.default_top_k,
        exclude=[opts.video_id],
    )
    search_s = time.perf_counter() - t_search
    return SimilarResponse(
        model=run.run_id,
        query=opts.video_id,
        neighbours=[
            Neighbour(video_id=h.video_id, label=h.label, distance=h.distance) for h in hits
        ],
        index_size=len(index),
        index_split=index.meta.get("split"),
        frames=None,
        timings=Timings(
            upload=upload_s,
            queue=0.0,
            decode_extract=0.0,
            head=0.0,
            search=search_s,
            total=time.perf_counter() - t0,
        ),
    )
