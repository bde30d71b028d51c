"""Jobs for long videos: an upload analysed in the background, polled, fetched or cancelled.

A job's upload stays on disk (in the service's own jobs folder) while the job waits or runs,
and is removed the moment it ends, whatever the end. Finished jobs keep their answer (small, in
memory) for ``result_ttl_s``; then they are forgotten. :class:`JobTable` bounds the jobs queued
or running at once; the disk of their uploads is bounded by an upload budget of their own. Jobs
live in memory: a restarted service forgets them, and removes whatever files the last one left
in its jobs folder (:func:`clean_jobs_dir`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.service.schemas import JobState
from api.service.served_runs import JobControl

log = logging.getLogger(__name__)


FINISHED = (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobsFull(Exception):
    """As many jobs are queued or running as the service takes."""


@dataclass
class Job:
    """One job; changed by its worker thread and by requests, under the table's lock."""

    id: str
    model: str
    control: JobControl
    frames_total: int | None = None
    state: JobState = JobState.queued
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None  # the answer (a PredictResponse) once succeeded
    error_status: int | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class JobTable:
    """The service's jobs by id: at most ``max_active`` queued or running; finished ones are
    dropped ``result_ttl_s`` after they end. Thread-safe."""

    def __init__(self, *, max_active: int, result_ttl_s: float) -> None:
        self.max_active = max_active
        self.result_ttl_s = result_ttl_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        with self._lock:
            return sum(not j.finished for j in self._jobs.values())

    def full(self) -> bool:
        return self.active >= self.max_active

    def add(self, model: str, control: JobControl, frames_total: int | None) -> Job:
        """A new queued job; :class:`JobsFull` when ``max_active`` are queued or running."""
        self.sweep()
        job = Job(id=secrets.token_hex(12), model=model, control=control)
        job.frames_total = frames_total
        with self._lock:
            if sum(not j.finished for j in self._jobs.values()) >= self.max_active:
                raise JobsFull(f"{self.max_active} job(s) queued or running")
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        self.sweep()
        with self._lock:
            return self._jobs.get(job_id)

    def remove(self, job_id: str) -> Job | None:
        """Forget a job; one still queued or running is cancelled first (its worker stops at
        its next frame, and its upload is removed when it does)."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is not None and not job.finished:
                self._finish(job, JobState.cancelled, None, "cancelled by the client")
        if job is not None:
            job.control.cancel("cancelled by the client")
        return job

    def started(self, job: Job) -> None:
        with self._lock:
            if job.state is JobState.queued:
                job.state = JobState.running
                job.started_at = time.time()

    def finish(
        self, job: Job, state: JobState, result: Any = None, error: tuple[int, str] | None = None
    ) -> None:
        """Record a job's end (a job already cancelled stays cancelled)."""
        with self._lock:
            if job.finished:
                return
            job.result = result
            self._finish(job, state, *(error or (None, None)))

    @staticmethod
    def _finish(job: Job, state: JobState, status: int | None, reason: str | None) -> None:
        job.state = state
        job.error_status = status
        job.error = reason
        job.finished_at = time.time()

    def expires_at(self, job: Job) -> float | None:
        return None if job.finished_at is None else job.finished_at + self.result_ttl_s

    def sweep(self) -> None:
        """Drop the finished jobs whose results have been kept long enough."""
        now = time.time()
        with self._lock:
            for job_id in [
                j.id
                for j in self._jobs.values()
                if j.finished_at is not None and j.finished_at + self.result_ttl_s <= now
            ]:
                del self._jobs[job_id]

    def cancel_all(self, reason: str) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.control.cancel(reason)
            self.finish(job, JobState.cancelled, error=(503, reason))


def clean_jobs_dir(folder: Path) -> int:
    """Remove the upload files a job folder holds (left by a service that did not stop
    cleanly); how many."""
    n = 0
    for path in folder.glob("upload-*.bin"):
        try:
            path.unlink()
            n += 1
        except FileNotFoundError:
            pass
    if n:
        log.info("removed %d job upload(s) left in %s by an earlier run", n, folder)
    return n
