"""``POST /v1/predict``: upload a video, get class probabilities."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

from api.service.deps import (
    StateDep,
    analyse_upload,
    frame_options,
    merge_options,
    refuse_if_busy,
    select_run,
    uploaded_file,
)
from api.service.routes._openapi import ERRORS, upload_body
from api.service.schemas import (
    ClassProbability,
    FramesInfo,
    MaxFrames,
    PredictOptions,
    PredictResponse,
    RunId,
    Stride,
    Timings,
    TopK,
    VideoInfo,
)

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
) -> PredictResponse:
    """Upload a video as multipart field ``file``; options as query parameters or form fields.

    ``stride`` and ``max_frames`` subsample the decoded frames (fewer frames, faster answer).
    """
    t0 = time.perf_counter()
    query = PredictOptions(top_k=top_k, model=model, stride=stride, max_frames=max_frames)
    if query.model is not None:
        select_run(state, query.model)
    refuse_if_busy(state)
    async with uploaded_file(request, state) as upload:
        opts = merge_options(query, upload.fields)
        run = select_run(state, opts.model)
        request.state.model = run.run_id
        n_stride, n_max = frame_options(state, opts.stride, opts.max_frames)
        result = await analyse_upload(
            state,
            request,
            upload,
            run,
            stride=n_stride,
            max_frames=n_max,
            proba=True,
            embedding=False,
        )
    assert result.proba is not None
    k = min(opts.top_k or state.settings.default_top_k, len(result.proba))
    order = np.argsort(-result.proba, kind="stable")[:k]
    names = run.predictor.class_names
    timings = Timings(
        upload=upload.seconds,
        queue=result.queue_s,
        decode_extract=result.decode_extract_s,
        head=result.head_s,
        total=time.perf_counter() - t0,
    )
    for stage in ("upload", "queue", "decode_extract", "head"):
        state.metrics.stage.labels(stage).observe(getattr(timings, stage))
    return PredictResponse(
        model=run.run_id,
        head=run.predictor.head,
        top_k=[
            ClassProbability(label=names[i], probability=float(np.clip(result.proba[i], 0, 1)))
            for i in order
        ],
        frames=FramesInfo(
            n_frames=result.n_frames, used=result.used, stride=n_stride, max_frames=n_max
        ),
        video=VideoInfo(
            width=result.width, height=result.height, fps=result.fps, size_bytes=upload.size
        ),
        beta=run.predictor.beta(),
        timings=timings,
    )
