"""Request options and response bodies of the service (pydantic models, shown in /docs)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

TopK = Annotated[int, Field(ge=1, le=1000, description="number of classes/neighbours returned")]
Stride = Annotated[int, Field(ge=1, le=1000, description="decode every stride-th frame")]
MaxFrames = Annotated[
    int, Field(ge=1, le=100_000, description="use at most this many frames (evenly spread)")
]
SimilarK = Annotated[
    int,
    Field(
        ge=1,
        le=1000,
        description="also return this many nearest training videos (from the same extraction)",
    ),
]
RunId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        description="a loaded run (see /v1/models): its id, its run directory's name, or its "
        "head when one loaded run has that head",
    ),
]
VideoId = Annotated[
    str, Field(min_length=1, max_length=300, description="id of an indexed training video")
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PredictOptions(_Model):
    """Options of /v1/predict, given as query parameters or as multipart form fields."""

    top_k: TopK | None = None
    model: RunId | None = None
    stride: Stride | None = None
    max_frames: MaxFrames | None = None
    similar: SimilarK | None = None


class SimilarOptions(_Model):
    """Options of /v1/similar: an upload, or ``video_id`` of an indexed training video."""

    top_k: TopK | None = None
    model: RunId | None = None
    stride: Stride | None = None
    max_frames: MaxFrames | None = None
    video_id: VideoId | None = None


class JobOptions(_Model):
    """Options of POST /v1/jobs, given as query parameters or as multipart form fields."""

    top_k: TopK | None = None
    model: RunId | None = None
    stride: Stride | None = None
    max_frames: MaxFrames | None = None


class ErrorResponse(_Model):
    detail: str = Field(description="what was wrong, in words")


class ClassProbability(_Model):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class FramesInfo(_Model):
    n_frames: int = Field(description="frames decoded from the video (before subsampling)")
    used: dict[str, int] = Field(description="frame features the head saw, per stream")
    stride: int
    max_frames: int | None
    times: list[float] | None = Field(
        default=None,
        description="presentation time in seconds of each frame the head saw, in order",
    )


class VideoInfo(_Model):
    width: int
    height: int
    fps: float | None
    size_bytes: int = Field(description="size of the upload")


class Timings(_Model):
    """Seconds spent in each stage of one request."""

    upload: float = Field(description="receiving the upload")
    queue: float = Field(description="waiting for a free worker")
    decode_extract: float = Field(description="decoding, optical flow and backbone features")
    head: float = Field(description="the pooling head (and embedding, for /v1/similar)")
    search: float = Field(default=0.0, description="the similarity search")
    total: float = Field(description="whole request, as the service saw it")


class PredictResponse(_Model):
    model: str = Field(description="run id that answered")
    head: str
    top_k: list[ClassProbability] = Field(description="most probable classes, best first")
    frames: FramesInfo
    video: VideoInfo
    beta: dict[str, list[list[float]]] | None = Field(
        default=None, description="the run's learned pyramid weights per stream, level by level"
    )
    similar: list[Neighbour] | None = Field(
        default=None,
        description="with ?similar=K: the K nearest training videos, nearest first (the same "
        "decoding and extraction as the prediction)",
    )
    timings: Timings


class Neighbour(_Model):
    video_id: str
    label: str | None
    distance: float = Field(ge=0.0, le=2.0, description="cosine distance, 1 - cos, in [0, 2]")


PredictResponse.model_rebuild()


class SimilarResponse(_Model):
    model: str = Field(description="run id whose embedding and index answered")
    query: str = Field(description="'upload' or the video_id searched by")
    neighbours: list[Neighbour] = Field(description="nearest indexed videos, nearest first")
    index_size: int = Field(description="videos in the index")
    index_split: str | None = Field(description="store split the index was built from")
    frames: FramesInfo | None = Field(default=None, description="for an upload")
    timings: Timings


class IndexKind(_Model):
    """How a run's similar-video index holds its vectors."""

    kind: str = Field(description="flat (exact), hnsw, ivfpq, or pca (older reduced indexes)")
    factory: str = Field(description="the faiss index_factory string that builds it")
    params: dict[str, int] = Field(description="its parameters (nlist, m, nbits, nprobe, ...)")
    bytes: int | None = Field(description="size of the saved index file")
    rerank_candidates: int | None = Field(
        default=None,
        description="a compressed index's candidates per neighbour wanted, re-ranked by their "
        "exact similarity from the full embeddings on disk (none: no re-ranking)",
    )


class ModelInfo(_Model):
    id: str
    head: str
    streams: list[str]
    classes: list[str]
    beta: dict[str, list[list[float]]] | None
    metrics: dict[str, float | int | None] = Field(
        description="summary of the run's test metrics (top1, top5, mean_class_accuracy, ...)"
    )
    default: bool = Field(description="answers requests that name no model")
    similarity_index: int | None = Field(description="indexed videos, or None without an index")
    similarity_index_kind: IndexKind | None = Field(
        default=None, description="the similar-video index's kind, or None without an index"
    )


class ModelsResponse(_Model):
    models: list[ModelInfo]


class Health(_Model):
    status: str


class Readiness(_Model):
    ready: bool
    models: int = Field(description="runs loaded")
    workers: int = Field(description="inference workers alive")
    queue_waiting: int
    queue_size: int


class LimitsResponse(_Model):
    """What one request may cost this service; larger requests are refused, not queued."""

    max_upload_bytes: int = Field(description="largest upload (413 beyond)")
    max_frames: int | None = Field(
        description="frames used per video at most; a longer video is subsampled to this many "
        "(evenly spread) and a larger max_frames is refused (422); None: no bound"
    )
    default_max_frames: int | None = Field(description="frames used when a request names none")
    max_decoded_frames: int = Field(description="frames a video may have (413 beyond)")
    max_frame_pixels: int = Field(description="width x height of a frame at most (413 beyond)")
    job_timeout_s: float = Field(description="wall seconds one video may take in a worker (503)")
    upload_budget_bytes: int = Field(
        description="disk all uploads in progress may hold together (503 with Retry-After beyond)"
    )
    upload_budget_used_bytes: int = Field(description="disk uploads in progress hold now")
    upload_idle_timeout_s: float = Field(description="an upload silent this long is dropped (408)")
    upload_timeout_s: float = Field(description="an upload may take this long in all (408)")
    workers: int = Field(description="inference workers")
    queue_size: int = Field(description="requests that may wait for a worker (503 beyond)")


class JobState(str, enum.Enum):
    """Where a job is: ``queued`` and ``running`` jobs hold their upload; the others are done."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobProgress(_Model):
    frames_decoded: int = Field(ge=0, description="frames decoded so far")
    frames_total: int | None = Field(
        description="frames the video has, as its container counts them (None: unknown)"
    )
    fraction: float | None = Field(
        ge=0.0, le=1.0, description="frames_decoded / frames_total (1 once succeeded)"
    )


class JobError(_Model):
    status_code: int = Field(description="the HTTP status /v1/predict would have answered")
    detail: str = Field(description="what went wrong, in words")


class JobStatus(_Model):
    """A job for a long video: where it is, how far, and its answer once it has one."""

    id: str = Field(description="the job's id, as in its URL /v1/jobs/{id}")
    status: JobState
    model: str = Field(description="run id that answers")
    created_at: datetime
    started_at: datetime | None = Field(default=None, description="when a worker took it")
    finished_at: datetime | None = Field(default=None)
    expires_at: datetime | None = Field(
        default=None, description="when a finished job and its result are forgotten (then 404)"
    )
    progress: JobProgress
    result: PredictResponse | None = Field(
        default=None, description="the answer, once status is 'succeeded'"
    )
    error: JobError | None = Field(default=None, description="why it failed or stopped")
