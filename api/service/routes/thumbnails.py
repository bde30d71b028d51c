"""``POST /v1/thumbnails``: small pictures of the frames a prediction uses, for the page.

A separate endpoint, so that ``/v1/predict``'s answer stays as it is: the page sends the same
upload and frame options here after its prediction.
"""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import Field

from api.service.deps import StateDep, frame_options, run_upload_job, upload_and_options
from api.service.routes._openapi import ERRORS, upload_body
from api.service.schemas import MaxFrames, Stride, _Model
from api.service.served_runs import JobControl, Limits, WorkerContext
from api.service.thumbnails import FrameStrip, frame_strip

router = APIRouter(prefix="/v1", tags=["predict"])

Count = Annotated[int, Field(ge=1, le=64, description="thumbnails at most (evenly spread)")]
Height = Annotated[int, Field(ge=16, le=256, description="height of a thumbnail in pixels")]


class ThumbnailOptions(_Model):
    """Options of /v1/thumbnails, as query parameters or multipart form fields."""

    stride: Stride | None = None
    max_frames: MaxFrames | None = None
    count: Count | None = None
    height: Height | None = None


class ThumbnailImage(_Model):
    frame: int = Field(description="index of the frame among the decoded frames")
    time: float | None = Field(description="seconds from the start (frame / fps)")
    image: str = Field(description="the thumbnail, a data: URI of a small JPEG")


class ThumbnailsResponse(_Model):
    n_frames: int = Field(description="frames decoded from the video")
    used: list[int] = Field(description="indices of the frames a prediction uses, in order")
    stride: int
    max_frames: int | None
    fps: float | None
    width: int
    height: int
    thumbnails: list[ThumbnailImage] = Field(description="some of the frames used, in order")
    seconds: float = Field(description="whole request, as the service saw it")


@router.post(
    "/thumbnails",
    response_model=ThumbnailsResponse,
    responses=ERRORS,
    openapi_extra=upload_body(required=True),
    summary="Thumbnails of the frames a prediction uses",
)
async def thumbnails(
    request: Request,
    state: StateDep,
    stride: Annotated[Stride | None, Query()] = None,
    max_frames: Annotated[MaxFrames | None, Query()] = None,
    count: Annotated[Count | None, Query()] = None,
    height: Annotated[Height | None, Query()] = None,
) -> ThumbnailsResponse:
    """Upload a video as multipart field ``file``: which of its frames ``/v1/predict`` uses with
    the same ``stride`` and ``max_frames``, and ``count`` small JPEG thumbnails among them."""
    t0 = time.perf_counter()
    query = ThumbnailOptions(stride=stride, max_frames=max_frames, count=count, height=height)
    async with upload_and_options(request, state, query) as (upload, opts):
        n_stride, n_max = frame_options(state, opts.stride, opts.max_frames)

        def make_job(
            path: Path, limits: Limits, control: JobControl
        ) -> Callable[[WorkerContext], FrameStrip]:
            strip = functools.partial(
                frame_strip,
                path,
                stride=n_stride,
                max_frames=n_max,
                count=opts.count or 12,
                height=opts.height or 72,
                limits=limits,
                control=control,
            )
            return lambda _ctx: strip()  # no extractor needed: the worker's context is unused

        strip = await run_upload_job(state, request, upload, make_job)
    return ThumbnailsResponse(
        n_frames=strip.n_frames,
        used=strip.used,
        stride=n_stride,
        max_frames=n_max,
        fps=strip.fps,
        width=strip.width,
        height=strip.height,
        thumbnails=[
            ThumbnailImage(
                frame=t.frame,
                time=t.time_s,
                image="data:image/jpeg;base64," + base64.b64encode(t.jpeg).decode("ascii"),
            )
            for t in strip.thumbnails
        ],
        seconds=time.perf_counter() - t0,
    )
