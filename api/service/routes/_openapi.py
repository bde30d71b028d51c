"""OpenAPI pieces shared by the upload routes."""

from __future__ import annotations

from typing import Any

from api.service.schemas import ErrorResponse


def upload_body(required: bool, extra_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI request body of a streamed multipart upload (parsed by hand, not by FastAPI).

    Only the video is documented in the body: options are query parameters, where their types
    mean something (every multipart field is text). The service still reads an option sent as
    a form field of the same name (it wins over the query), as older clients do.
    """
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "the video"},
            **(extra_fields or {}),
        },
        "additionalProperties": False,
    }
    if required:
        schema["required"] = ["file"]
    return {
        "requestBody": {
            "required": required,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty upload or malformed multipart body"},
    404: {"model": ErrorResponse, "description": "no loaded model with that id or name"},
    408: {"model": ErrorResponse, "description": "the upload stalled or took too long"},
    413: {
        "model": ErrorResponse,
        "description": "upload, frame count or frame size over the limits (see /v1/limits)",
    },
    415: {
        "model": ErrorResponse,
        "description": "not a video container (an image, a playlist, ...), or no video stream",
    },
    422: {
        "model": ErrorResponse,
        "description": "bad option (a model name several loaded runs answer to: the detail "
        "lists their ids), or a video that cannot be decoded",
    },
    503: {
        "model": ErrorResponse,
        "description": "busy, uploads over the disk budget, the video ran past the time limit "
        "(see Retry-After), or starting",
    },
}
