"""The page a person opens: ``GET /`` (upload a video, see what the model saw), its assets under
``/static``, and ``GET /runs`` (the loaded runs compared, as ``framepool report`` writes them).

Every asset ships in the package (``api/service/static``) and the page refers to nothing
outside the service, so it works on a closed network.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api.service.deps import StateDep
from api.service.routes import attention, thumbnails

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def static_dir() -> Path:
    """The folder of the page's assets (HTML, CSS, script)."""
    return STATIC_DIR


def add_page(app: FastAPI) -> None:
    """Serve ``/``, ``/static/*`` and ``/runs``, and the endpoints the page needs beside
    prediction (``POST /v1/thumbnails``, ``POST /v1/attention``)."""
    app.include_router(thumbnails.router)
    app.include_router(attention.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="page-static")
    reports: dict[tuple[str, ...], str] = {}
    lock = threading.Lock()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/runs", include_in_schema=False, response_class=HTMLResponse)
    async def runs(state: StateDep) -> HTMLResponse:
        """The loaded runs side by side (drawn once: the runs do not change while served)."""
        dirs = tuple(str(run.run_dir) for run in state.registry.runs.values())

        def render() -> str:
            from aggregator.report import render_report

            with lock:
                if dirs not in reports:
                    reports[dirs] = render_report(
                        list(dirs), title="framepool: the runs this service answers with"
                    )
                return reports[dirs]

        return HTMLResponse(await run_in_threadpool(render))
