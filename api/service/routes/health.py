"""``GET /healthz`` (the process answers) and ``GET /readyz`` (models loaded, workers alive)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready"}},
    summary="Readiness: models loaded and workers alive",
)
def readyz(request: Request) -> Readiness | JSONResponse:
    state = getattr(request.app.state, "service", None)
    if state is None:
        body = Readiness(ready=False, models=0, workers=0, queue_waiting=0, queue_size=0)
        return JSONResponse(body.model_dump(), status_code=503)
    queue = state.queue
    alive = queue.workers if queue.alive() else 0
    body = Readiness(
        ready=bool(state.registry.runs) and alive > 0,
        models=len(state.registry.runs),
        workers=alive,
        queue_waiting=queue.waiting,
        queue_size=queue.maxsize,
    )
    if not body.ready:
        return JSONResponse(body.model_dump(), status_code=503)
    return body
