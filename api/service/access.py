"""One access-log line per HTTP request: method, path, status, bytes, seconds, model.

Logged on the ``api.service.access`` logger at info level, after the answer has gone out::

    POST /v1/predict 200 in=158912 out=912 0.412s model=tp-3f2a client=127.0.0.1

A request whose client went away before the answer (status 499) is logged as such, at info level
too: it is an expected event, not an error. The route sets ``request.state.model`` to the run that
answered; it is ``-`` for requests that used none.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.service.uploads import CLIENT_CLOSED

log = logging.getLogger(__name__)


class AccessLogMiddleware:
    """Pure ASGI middleware (streaming-safe) writing the access line of every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        received = 0
        sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            seconds = time.perf_counter() - start
            state = scope.get("state") or {}
            model = state.get("model") if isinstance(state, dict) else None
            client = scope.get("client")
            line = "%s %s %s in=%d out=%d %.3fs model=%s client=%s"
            args = (
                scope.get("method", "-"),
                scope.get("path", "-"),
                "-" if status is None else status,
                received,
                sent,
                seconds,
                model or "-",
                client[0] if client else "-",
            )
            if status == CLIENT_CLOSED:
                log.info(line + " (client went away)", *args)
            else:
                log.info(line, *args)
