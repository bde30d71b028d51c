"""``/docs`` (Swagger UI) and ``/redoc`` served with local assets, so that they work offline.

FastAPI's own pages load their JavaScript and CSS from a CDN; a service on a closed network then
shows a blank page. The assets come from the ``fastapi-offline`` package (its ``static`` folder:
Swagger UI 5, which reads OpenAPI 3.1, and ReDoc) and are served under ``/docs-static``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = "/docs-static"


def assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def add_offline_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` from local assets (create the app with ``docs_url=None,
    redoc_url=None``)."""
    app.mount(STATIC, StaticFiles(directory=assets_dir()), name="docs-static")

    def page(path: str, render: Callable[[str], HTMLResponse]) -> None:
        """``GET path``: ``render(root)``, ``root`` the prefix the app is served under, which the
        page's asset and OpenAPI URLs need behind a proxy."""

        def endpoint(request: Request) -> HTMLResponse:
            return render(request.scope.get("root_path", ""))

        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)

    page(
        "/docs",
        lambda root: get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - docs",
            swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC}/favicon.png",
        ),
    )
    page(
        "/redoc",
        lambda root: get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC}/favicon.png",
            with_google_fonts=False,
        ),
    )
