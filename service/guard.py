"""Auth, the in-flight and body-size limits, and the request metrics, around every request.

Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs each request
through a task group and memory streams, a cost every request pays.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.datastructures import Headers

from .body import body_limit_text
from .errors import Overloaded, PayloadTooLarge, ServiceError, Unauthorized, error_response

# Metric label values come from the service, never from the client: unknown paths are "other".
ENDPOINTS = {"classify", "detect", "segment", "models", "healthz", "readyz", "docs", "root"}


def endpoint_of(path: str) -> str:
    """The metric label of a path: the /v1 and service routes by name, /v2 routes as
    v2_infer, v2_ready (a model's readiness), v2_health and v2_metadata."""
    if path == "/v2" or path.startswith("/v2/"):
        if path.startswith("/v2/health/"):
            return "v2_health"
        last = path.rstrip("/").rsplit("/", 1)[-1]
        return {"infer": "v2_infer", "ready": "v2_ready"}.get(last, "v2_metadata")
    name = path.rstrip("/").rsplit("/", 1)[-1] or "root"
    return name if name in ENDPOINTS else "other"


def takes_keys(path: str) -> bool:
    """The routes that need an API key (when keys are set) and count against max_in_flight:
    /v1 and the protocol's model routes; health, docs and the page do not."""
    return path.startswith(("/v1/", "/v2/models"))


class GuardMiddleware:
    """Runs the checks of the server replica (`server()`) on HTTP requests; a request that
    `lane(scope)` has a handler for goes to it instead of the rest of the app."""

    def __init__(self, app, server: Callable[[], Any], lane: Callable[[dict], Any]):
        self.app, self.server, self.lane = app, server, lane

    async def __call__(self, scope, receive, send) -> None:
        server = self.server()
        if scope["type"] != "http" or server is None:  # or outside a server replica
            await self.app(scope, receive, send)
            return
        await guard(server, self.lane(scope) or self.app, scope, receive, send)


async def guard(server: Any, app, scope, receive, send) -> None:
    path: str = scope["path"]
    api = takes_keys(path)
    endpoint = endpoint_of(path)
    started = time.perf_counter()
    status = 500
    # the route sets the model it resolved in request.state (which lives in scope["state"])
    state = scope.setdefault("state", {})
    state["model"] = ""

    async def send_and_note_status(message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    in_flight = server.in_flight
    count = sum(in_flight.values())
    in_flight[endpoint] = in_flight.get(endpoint, 0) + 1
    metrics = server.metrics
    try:  # nothing above can fail; everything taken is given back below
        _report_in_flight(server)
        config = server.config
        headers = Headers(scope=scope)
        refusal: ServiceError | None = None
        if api and server.api_keys and not authorised(headers, server.api_keys):
            refusal = Unauthorized()
        elif api and count >= config.max_in_flight:
            refusal = Overloaded(
                "the server is at its in-flight request limit", config.retry_after_s
            )
        elif _content_length(headers) > config.max_body_bytes:
            refusal = PayloadTooLarge(body_limit_text(config))
        elif api and (full := server.full_model(path, scope["query_string"])) is not None:
            state["model"] = full.name
            refusal = full.overloaded()
        if refusal is not None:
            response = error_response(
                refusal.status, refusal.code, refusal.message, refusal.headers, path
            )
            await response(scope, receive, send_and_note_status)
        else:
            await app(scope, receive, send_and_note_status)
    finally:
        in_flight[endpoint] -= 1
        if api:
            # the model the route resolved (a served name), whatever the client asked for
            model = state.get("model") or "unknown"
            key = (endpoint, model, str(status))
            server.request_counts[key] = server.request_counts.get(key, 0) + 1
            tags = {"endpoint": endpoint, "model": model}
            metrics.duration.observe(time.perf_counter() - started, tags=tags)


REPORT_S = 1.0


def _report_in_flight(server: Any) -> None:
    """Keep the in-flight gauge and the request counter current from a task that reports them
    every second: Ray exports them every few seconds anyway, and setting the gauge twice and
    the counter once a request cost the event loop more than any other part of the guard."""
    if server.in_flight_reporter is None:
        server.in_flight_reporter = asyncio.get_running_loop().create_task(_report_forever(server))


async def _report_forever(server: Any) -> None:
    gauge, counter = server.metrics.in_flight, server.metrics.requests
    while True:
        for endpoint, count in list(server.in_flight.items()):
            gauge.set(count, tags={"endpoint": endpoint})
        counts, server.request_counts = server.request_counts, {}
        for (endpoint, model, status), n in counts.items():
            counter.inc(n, tags={"endpoint": endpoint, "model": model, "status": status})
        for host in list(server.hosts.values()):
            host.report_info()
        await asyncio.sleep(REPORT_S)


def authorised(headers: Mapping[str, str], keys: set[str]) -> bool:
    """Whether the request carries one of the keys (`Authorization: Bearer` or `X-API-Key`;
    HTTP headers, or gRPC metadata)."""
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return (key or headers.get("x-api-key", "")) in keys


def _content_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length") or 0)
    except ValueError:
        return 0
