"""Admission of HTTP requests, around every request of a server replica: the data plane's
checks (API keys, the in-flight limit, a model's full queue), the body-size limit from
`Content-Length`, and the request metrics, before FastAPI routes the request.

Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs each request
through a task group and memory streams, a cost every request pays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.datastructures import Headers

from .body import body_limit_text
from .data_plane import DataPlane
from .errors import PayloadTooLarge, ServiceError, error_response
from .route_table import Route, route_of


class GuardMiddleware:
    """Admits each HTTP request through the data plane; a request on a route of the table
    marked `fast` goes to the handler `lane(scope)` gives, where it gives one, instead of the
    rest of the app."""

    def __init__(self, app, plane: DataPlane, lane: Callable[[dict], Any]):
        self.app, self.plane, self.lane = app, plane, lane

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        plane, path = self.plane, scope["path"]
        route = route_of(path)
        app = (self.lane(scope) if route.fast else None) or self.app
        status = 500
        # the route sets the model it resolved in request.state (which lives in scope["state"])
        state = scope.setdefault("state", {})
        state["model"], state["version"] = "", ""

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if state["version"]:  # every answer says which version made it
                    version = (b"x-model-version", state["version"].encode())
                    message["headers"] = [*message.get("headers", []), version]
            await send(message)

        started = plane.enter(route)
        try:  # nothing above can fail; everything taken is given back below
            headers = Headers(scope=scope)
            try:
                plane.admit(route, headers)
                if _content_length(headers) > plane.config.max_body_bytes:
                    raise PayloadTooLarge(body_limit_text(plane.config))
                if route.infers:
                    full = plane.model_if_full(route, _model_named(route, path, scope))
                    if full is not None:
                        state["model"] = full.name
                        raise full.overloaded()
            except ServiceError as refusal:
                response = error_response(
                    refusal.status, refusal.code, refusal.message, refusal.headers, path=path
                )
                await response(scope, receive, send_and_note_status)
                return
            await app(scope, receive, send_and_note_status)
        finally:
            plane.leave(route, state["model"], state["version"], status, started)


def _model_named(route: Route, path: str, scope: dict) -> str | None:
    """The model an inference request names: `/v2/models/{name}/...`, or `?model=` (the last
    one, as FastAPI takes it), without parsing the rest of the query."""
    if route.protocol == "v2":
        return unquote(path.split("/")[3])
    query: bytes = scope["query_string"]
    if b"model=" not in query:
        return None
    values = [
        v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == "model"
    ]
    return values[-1] if values else None


def _content_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length") or 0)
    except ValueError:
        return 0
