"""``GET /metrics``: Prometheus text exposition of this app's metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.service.prometheus import ServiceMetrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus metrics"}},
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    registry: ServiceMetrics = request.app.state.metrics
    state = getattr(request.app.state, "service", None)
    if state is not None:
        registry.queue_changed(state.queue.waiting, state.queue.running)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
