"""Service configuration: one pydantic-settings class (arguments or ``FRAMEPOOL_*`` env vars)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the prediction service reads; no path is taken from a request."""

    model_config = SettingsConfigDict(env_prefix="FRAMEPOOL_", extra="forbid")

    runs: list[Path] = Field(
        default_factory=list, description="run directories to load; the first is the default"
    )
    store: Path | None = Field(
        default=None,
        description="feature store the runs were trained on; builds a missing similarity index",
    )
    device: str = Field(default="cpu", description="torch device for extraction (cpu, cuda, auto)")
    workers: int = Field(default=1, ge=1, le=64, description="inference worker threads")
    queue_size: int = Field(
        default=8,
        ge=0,
        le=10_000,
        description="requests that may wait for a busy worker; one more is answered 503",
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After sent with a 503")
    max_upload_mb: float = Field(default=200.0, gt=0, description="largest accepted upload")
    upload_dir: Path | None = Field(
        default=None,
        description="private folder for uploads in flight (default: a fresh temporary folder)",
    )
    default_top_k: int = Field(default=5, ge=1)
    default_stride: int = Field(default=1, ge=1, description="decode every stride-th frame")
    default_max_frames: int | None = Field(
        default=None, ge=1, description="frames used per video (evenly spread); None: all"
    )
    max_frames_limit: int | None = Field(
        default=300,
        ge=1,
        description="frames used per video at most: a longer video is subsampled to this many "
        "(evenly spread), and no request may ask for more; None: no bound",
    )
    max_decoded_frames: int = Field(
        default=18_000,
        ge=1,
        description="frames a video may have at most (all are decoded to pick the ones used); "
        "a longer one is refused with 413",
    )
    max_frame_pixels: int = Field(
        default=3840 * 2160,
        ge=1,
        description="width x height a frame may have at most; a larger video is refused with 413",
    )
    job_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="wall seconds a worker may spend on one video; then the job is stopped (503)",
    )
    upload_budget_mb: float = Field(
        default=1024.0,
        gt=0,
        description="disk all uploads in progress (received or waiting for a worker) may take; "
        "an upload that would exceed it is refused with 503 and Retry-After",
    )
    upload_idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds an upload may send nothing before it is dropped (408)",
    )
    upload_timeout_s: float = Field(
        default=600.0, gt=0, description="seconds a whole upload may take (408)"
    )
    batch_max_frames: int = Field(
        default=64,
        ge=0,
        le=100_000,
        description="frames of concurrent uploads one forward pass of a model takes at most "
        "(the batcher in front of each model); 0: no batcher, each upload runs its own passes",
    )
    batch_max_wait_s: float = Field(
        default=0.01,
        ge=0,
        le=10,
        description="seconds the batcher waits for other uploads' frames before a pass that is "
        "not full (it never waits when every worker's frames are in)",
    )
    jobs_workers: int = Field(
        default=1, ge=1, le=64, description="worker threads for /v1/jobs (long videos)"
    )
    jobs_max: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description="jobs queued or running at once; one more is answered 503 with Retry-After",
    )
    jobs_dir: Path | None = Field(
        default=None,
        description="private folder for job uploads, owned by this service: leftovers of an "
        "earlier run are removed at start (default: a fresh temporary folder)",
    )
    jobs_max_upload_mb: float = Field(default=4096.0, gt=0, description="largest job upload")
    jobs_budget_mb: float = Field(
        default=8192.0,
        gt=0,
        description="disk all job uploads (received, queued or running) may take; beyond: 503",
    )
    jobs_result_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="seconds a finished job's result is kept; then /v1/jobs/{id} answers 404",
    )
    jobs_max_frames_limit: int | None = Field(
        default=3000,
        ge=1,
        description="frames a job uses at most (evenly spread); None: no bound",
    )
    jobs_max_decoded_frames: int = Field(
        default=216_000, ge=1, description="frames a job's video may have (2 h at 30 fps)"
    )
    jobs_max_frame_pixels: int = Field(
        default=7680 * 4320, ge=1, description="width x height of a job's frames at most"
    )
    jobs_timeout_s: float = Field(
        default=3600.0, gt=0, description="wall seconds a job may run; then it fails"
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's own)"
    )

    @field_validator("runs")
    @classmethod
    def _unique_runs(cls, runs: list[Path]) -> list[Path]:
        seen: set[Path] = set()
        for run in runs:
            key = run.resolve()
            if key in seen:
                raise ValueError(f"run directory {str(run)!r} given twice")
            seen.add(key)
        return runs

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_budget_bytes(self) -> int:
        return int(self.upload_budget_mb * 1024 * 1024)

    @property
    def jobs_max_upload_bytes(self) -> int:
        return int(self.jobs_max_upload_mb * 1024 * 1024)

    @property
    def jobs_budget_bytes(self) -> int:
        return int(self.jobs_budget_mb * 1024 * 1024)
