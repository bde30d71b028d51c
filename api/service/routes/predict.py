"""``POST /v1/predict``: upload a video, get class probabilities."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

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
    ClassProbability,
    FramesInfo,
    MaxFrames,
    Neighbour,
    PredictOptions,
    PredictResponse,
    RunId,
    SimilarK,
    Stride,
    Timings,
    TopK,
    VideoInfo,
)
from api.service.served_runs import Analysis, LoadedRun
from api.service.uploads import Upload

router = APIRouter(prefix="/v1", tags=["predict"])


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=upload_body(required=True),
    summary="Classify an uploaded video",
)
async def predict(
    request: Request,
    state: StateDep,
    top_k: Annotated[TopK | None, Query()] = None,
    model: Annotated[RunId | None, Query()] = None,
    stride: Annotated[Stride | None, Query()] = None,
    max_frames: Annotated[MaxFrames | None, Query()] = None,
    similar: Annotated[SimilarK | None, Query()] = None,
) -> PredictResponse:
    """Upload a video as multipart field ``file``; options as query parameters or form fields.

    ``stride`` and ``max_frames`` subsample the decoded frames (fewer frames, faster answer).
    """
    t0 = time.perf_counter()
    query = PredictOptions(
        top_k=top_k, model=model, stride=stride, max_frames=max_frames, similar=similar
    )
    if query.model is not None and query.similar is not None:
        require_index(select_run(state, query.model), f"similar={query.similar}")
    refuse_if_busy(state)
    async with uploaded_file(request, state) as upload:
        opts = merge_options(query, upload.fields)
        run = select_run(state, opts.model)
        request.state.model = run.run_id
        if opts.similar is not None:
            require_index(run, f"similar={opts.similar}")
        n_stride, n_max = frame_options(state, opts.stride, opts.max_frames)
        result = await analyse_upload(
            state,
            request,
            upload,
            run,
            stride=n_stride,
            max_frames=n_max,
            proba=True,
            embedding=opts.similar is not None,
        )
    neighbours = None
    search_s = 0.0
    if opts.similar is not None:
        assert run.index is not None and result.embedding is not None
        t_search = time.perf_counter()
        hits = run.index.search(result.embedding, opts.similar)
        search_s = time.perf_counter() - t_search
        neighbours = [
            Neighbour(video_id=h.video_id, label=h.label, distance=h.distance) for h in hits
        ]
    answer = prediction(
        state,
        run,
        result,
        upload,
        top_k=opts.top_k,
        stride=n_stride,
        max_frames=n_max,
        started=t0,
        search_s=search_s,
    )
    answer.similar = neighbours
    return answer


def prediction(
    state: ServiceState,
    run: LoadedRun,
    result: Analysis,
    upload: Upload,
    *,
    top_k: int | None,
    stride: int,
    max_frames: int | None,
    started: float,
    search_s: float = 0.0,
    observe: bool = True,
) -> PredictResponse:
    """The answer for ``result`` (the worker's analysis of ``upload``), timed from ``started``
    (a ``time.perf_counter()``); with ``observe``, the stage times go to the service's
    metrics (a request's; a job's would blur them)."""
    assert result.proba is not None
    k = min(top_k or state.settings.default_top_k, len(result.proba))
    order = np.argsort(-result.proba, kind="stable")[:k]
    names = run.predictor.class_names
    timings = Timings(
        upload=upload.seconds,
        queue=result.queue_s,
        decode_extract=result.decode_extract_s,
        head=result.head_s,
        search=search_s,
        total=time.perf_counter() - started,
    )
    for stage in ("upload", "queue", "decode_extract", "head"):
        if observe:
            state.metrics.stage.labels(stage).observe(getattr(timings, stage))
    return PredictResponse(
        model=run.run_id,
        head=run.predictor.head,
        top_k=[
            ClassProbability(label=names[i], probability=float(np.clip(result.proba[i], 0, 1)))
            for i in order
        ],
        frames=FramesInfo(
            n_frames=result.n_frames,
            used=result.used,
            stride=stride,
            max_frames=max_frames,
            times=result.times,
        ),
        video=VideoInfo(
            width=result.width, height=result.height, fps=result.fps, size_bytes=upload.size
        ),
        beta=run.predictor.beta(),
        timings=timings,
    )
