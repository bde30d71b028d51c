"""``GET /v1/models``: the runs this service answers with."""

from __future__ import annotations

from fastapi import APIRouter

from api.service.deps import StateDep
from api.service.schemas import IndexKind, ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="Loaded runs")
def list_models(state: StateDep) -> ModelsResponse:
    registry = state.registry
    return ModelsResponse(
        models=[
            ModelInfo(
                id=run.run_id,
                head=run.predictor.head,
                streams=list(run.predictor.streams),
                classes=list(run.predictor.class_names),
                beta=run.predictor.beta(),
                metrics=run.metrics,
                default=run.run_id == registry.default_id,
                similarity_index=None if run.index is None else len(run.index),
                similarity_index_kind=None
                if run.index is None
                else IndexKind.model_validate(run.index.kind()),
            )
            for run in registry.runs.values()
        ]
    )
