"""Every path the service answers, said once: its metric label, whether it is an API route (an
API key where keys are set, counted against the in-flight limit), the task it runs and the
protocol whose words its errors take.

The guard, the error rendering and the HAProxy rules all read this table; nothing else knows
paths. Plain Python with no imports of the service, so `convnext-serve-haproxy` reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TASK_NAMES = ("classify", "detect", "segment")


@dataclass(frozen=True)
class Route:
    """What the service knows of a request's path before any route handler runs."""

    endpoint: str  # the metric label: the service's own name, never the client's path
    api: bool  # needs an API key (where keys are set); counts against max_in_flight
    # whose words its errors take: `{code, message}`, the v2 string, or a gRPC status
    protocol: Literal["v1", "v2", "grpc"] = "v1"
    task: str | None = None  # the /v1 inference route of this task
    fast: bool = False  # the hot path: a handler may take it past FastAPI's routing
    admin: bool = False  # the model repository: an admin key instead of an API key

    @property
    def infers(self) -> bool:
        """Whether it runs a model (what a model's full queue refuses before the body)."""
        return self.task is not None or self.endpoint == "v2_infer"


# the paths answered as they are
EXACT: dict[str, Route] = {
    **{
        f"/v1/{task}": Route(task, api=True, task=task, fast=task == "classify")
        for task in TASK_NAMES
    },
    "/v1/models": Route("models", api=True),
    "/healthz": Route("healthz", api=False),
    "/readyz": Route("readyz", api=False),
    "/docs": Route("docs", api=False),
    "/": Route("root", api=False),
    "/v2": Route("v2_metadata", api=False, protocol="v2"),
}
# the prefixes of the API routes (HAProxy refuses beyond a replica's capacity on these)
API_PREFIXES = ("/v1/", "/v2/models")
OTHER = Route("other", api=False)
REPOSITORY = Route("v2_repository", api=True, protocol="v2", admin=True)
PIPELINE = Route("pipeline", api=True)
# the RPCs of the Open Inference Protocol's gRPC service, as the HTTP routes they mirror
GRPC: dict[str, Route] = {
    "ServerLive": Route("grpc_health", api=False, protocol="grpc"),
    "ServerReady": Route("grpc_health", api=False, protocol="grpc"),
    "ServerMetadata": Route("grpc_metadata", api=False, protocol="grpc"),
    "ModelReady": Route("grpc_ready", api=True, protocol="grpc"),
    "ModelMetadata": Route("grpc_metadata", api=True, protocol="grpc"),
    "ModelInfer": Route("grpc_infer", api=True, protocol="grpc"),
    **{
        method: Route("grpc_repository", api=True, protocol="grpc", admin=True)
        for method in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
    },
}


def route_of(path: str) -> Route:
    """The route of a request's path; a path the service does not answer is `other`."""
    route = EXACT.get(path)
    if route is not None:
        return route
    if path.startswith("/v2/"):
        if path.startswith("/v2/repository/"):
            return REPOSITORY
        if path.startswith("/v2/health/"):
            return Route("v2_health", api=False, protocol="v2")
        if path.startswith("/v2/models"):
            # what follows /v2/models/{name}: [versions/{v}/](infer|ready), or nothing
            tail = path.rstrip("/").split("/")[4:]
            action = tail[-1] if len(tail) in (1, 3) else ""
            endpoint = {"infer": "v2_infer", "ready": "v2_ready"}.get(action, "v2_metadata")
            return Route(endpoint, api=True, protocol="v2")
        return Route("other", api=False, protocol="v2")
    if path.startswith("/v1/"):
        if path.startswith("/v1/pipelines/"):
            return PIPELINE
        return Route("other", api=True)
    return OTHER
