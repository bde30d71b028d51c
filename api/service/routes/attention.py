"""``POST /v1/attention``: where in its frames a map head (``stpn``) looks, for the page."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import Field

from api.service.attention import AttentionMaps, attention_maps, has_attention
from api.service.deps import (
    ServiceState,
    StateDep,
    frame_options,
    run_upload_job,
    select_run,
    upload_and_options,
)
from api.service.routes._openapi import ERRORS, upload_body
from api.service.schemas import MaxFrames, RunId, Stride, _Model
from api.service.served_runs import JobControl, Limits, LoadedRun, WorkerContext

router = APIRouter(prefix="/v1", tags=["predict"])


class AttentionOptions(_Model):
    """Options of /v1/attention, as query parameters or multipart form fields."""

    model: RunId | None = None
    stride: Stride | None = None
    max_frames: MaxFrames | None = None


class AttentionResponse(_Model):
    model: str = Field(description="run id that answered")
    head: str
    n_frames: int = Field(description="frames decoded from the video")
    frames: list[int] = Field(description="the map frames (indices among the decoded frames)")
    weights: list[list[list[float]]] = Field(
        description="[map frame][row][column]: the attention over the cells of each map frame "
        "(each frame's weights sum to 1)"
    )
    seconds: float = Field(description="whole request, as the service saw it")


@router.post(
    "/attention",
    response_model=AttentionResponse,
    responses=ERRORS,
    openapi_extra=upload_body(required=True),
    summary="Spatial attention of a map head (stpn) over an uploaded video",
)
async def attention(
    request: Request,
    state: StateDep,
    model: Annotated[RunId | None, Query()] = None,
    stride: Annotated[Stride | None, Query()] = None,
    max_frames: Annotated[MaxFrames | None, Query()] = None,
) -> AttentionResponse:
    """Upload a video as multipart field ``file``: the attention weights of ``model``'s head
    over the cells of every map frame, for the frames ``/v1/predict`` uses with the same
    options. A model whose head has no spatial attention answers 404."""
    t0 = time.perf_counter()
    query = AttentionOptions(model=model, stride=stride, max_frames=max_frames)
    _require_attention(state, query.model)
    async with upload_and_options(request, state, query) as (upload, opts):
        run = _require_attention(state, opts.model)
        request.state.model = run.run_id
        n_stride, n_max = frame_options(state, opts.stride, opts.max_frames)

        def make_job(
            path: Path, limits: Limits, control: JobControl
        ) -> Callable[[WorkerContext], AttentionMaps]:
            return functools.partial(
                attention_maps,
                run=run,
                path=path,
                stride=n_stride,
                max_frames=n_max,
                limits=limits,
                control=control,
            )

        maps = await run_upload_job(state, request, upload, make_job)
    return AttentionResponse(
        model=run.run_id,
        head=run.predictor.head,
        n_frames=maps.n_frames,
        frames=maps.frames,
        weights=maps.weights.tolist(),
        seconds=time.perf_counter() - t0,
    )


def _require_attention(state: ServiceState, model: str | None) -> LoadedRun:
    run = select_run(state, model)
    if not has_attention(run):
        raise HTTPException(
            404,
            f"model {run.run_id!r} ({run.predictor.head}) has no spatial attention; its learned "
            "temporal weights, where it has them, are 'beta' in /v1/predict and /v1/models",
        )
    return run
