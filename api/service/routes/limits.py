"""``GET /v1/limits``: how much work one request may cause, and how large an upload may be."""

from __future__ import annotations

from fastapi import APIRouter

from api.service.deps import StateDep
from api.service.schemas import LimitsResponse

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/limits", response_model=LimitsResponse, summary="Limits per request")
def limits(state: StateDep) -> LimitsResponse:
    s = state.settings
    return LimitsResponse(
        max_upload_bytes=s.max_upload_bytes,
        max_frames=s.max_frames_limit,
        default_max_frames=s.default_max_frames,
        max_decoded_frames=s.max_decoded_frames,
        max_frame_pixels=s.max_frame_pixels,
        job_timeout_s=s.job_timeout_s,
        upload_budget_bytes=s.upload_budget_bytes,
        upload_budget_used_bytes=state.uploads.used,
        upload_idle_timeout_s=s.upload_idle_timeout_s,
        upload_timeout_s=s.upload_timeout_s,
        workers=state.queue.workers,
        queue_size=state.queue.maxsize,
    )
