"""The data plane: the one object per server replica that every protocol calls.

`/v1` (`service.routes`), the Open Inference Protocol over REST (`service.v2`) and over gRPC
(`service.grpc_api`) are thin adapters over it: each turns its request into a route
(`service.route_table`), the images and the task's options, and its answer back into its own
words. Here, once for all of them: admission (API keys, the replica's in-flight limit, a
model's full queue), the request metrics, resolving the model, running the images, and the
replica's state (readiness, the models listed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from models.images import ImageError

from .config import PipelineConfig, ServerConfig
from .errors import Forbidden, ModelNotFound, Overloaded, Unauthorized, image_error
from .host import ModelHost
from .metrics import request_metrics
from .route_table import Route
from .runtime import BatchItem
from .served_models import ServedModels
from .versions import ServedModel

REPORT_S = 1.0  # how often the request counter and the in-flight gauge are reported


class DataPlane:
    """Resolve, admit, infer and report, for any protocol."""

    def __init__(
        self,
        config: ServerConfig,
        models: ServedModels,
        api_keys: set[str],
        admin_keys: frozenset[str] = frozenset(),
    ):
        self.config, self.models, self.api_keys = config, models, api_keys
        self.admin_keys = admin_keys
        self.repository: Any = None  # the replica's `RepositorySync`, once it has models
        self.pipelines: dict[str, PipelineConfig] = {}
        self.metrics = request_metrics()
        self.in_flight: dict[str, int] = {}  # by endpoint
        # API requests by (endpoint, model, version, status) since they were last reported
        self.request_counts: dict[tuple[str, str, str, str], int] = {}
        self._reporter: asyncio.Task | None = None

    # --------------------------------------------------------------------- admission

    def enter(self, route: Route) -> float:
        """Count a request in (every request that `leave` counts out); its start time."""
        self.in_flight[route.endpoint] = self.in_flight.get(route.endpoint, 0) + 1
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        return time.perf_counter()

    def admit(self, route: Route, headers: Mapping[str, str]) -> None:
        """Refuse an API request (just counted in) without a valid key (an admin key on the
        repository's routes), or beyond the replica's in-flight limit."""
        if not route.api:
            return
        if route.admin:
            if not self.admin_keys:
                raise Forbidden("the model repository API is off: no admin keys are set")
            if not authorised(headers, self.admin_keys):
                raise Unauthorized("a valid admin key is required (Authorization: Bearer <key>)")
        elif self.api_keys and not authorised(headers, self.api_keys):
            raise Unauthorized()
        if sum(self.in_flight.values()) > self.config.max_in_flight:
            raise Overloaded(
                "the server is at its in-flight request limit", self.config.retry_after_s
            )

    def leave(self, route: Route, model: str, version: str, status: int, started: float) -> None:
        """Count a request out; an API request's status and latency go to the metrics, with
        the model and version it resolved (served ones) or `unknown` and "", whatever the
        client asked for."""
        self.in_flight[route.endpoint] -= 1
        if route.api:
            model = model or "unknown"
            key = (route.endpoint, model, version, str(status))
            self.request_counts[key] = self.request_counts.get(key, 0) + 1
            tags = {"endpoint": route.endpoint, "model": model, "version": version}
            self.metrics.duration.observe(time.perf_counter() - started, tags=tags)

    async def _report_forever(self) -> None:
        """The in-flight gauge and the request counter, from one task every second: Ray exports
        them every few seconds anyway, and setting them per request cost the event loop more
        than any other part of admission."""
        gauge, counter = self.metrics.in_flight, self.metrics.requests
        while True:
            for endpoint, count in list(self.in_flight.items()):
                gauge.set(count, tags={"endpoint": endpoint})
            counts, self.request_counts = self.request_counts, {}
            for (endpoint, model, version, status), n in counts.items():
                tags = {"endpoint": endpoint, "model": model, "version": version, "status": status}
                counter.inc(n, tags=tags)
            for host in self.models.hosts():
                host.report_info()
            await asyncio.sleep(REPORT_S)

    # ---------------------------------------------------------------------- models

    def model(
        self,
        task: str | None,
        name: str | None,
        version: str | None = None,
        client: str | None = None,
    ) -> ModelHost:
        """The model version a request names (`task` None: by name, of any task; else that
        task's, the first configured by default; without a version, one drawn by weight,
        sticky per `client`), refused with 503 when its line is full, before any image is
        read."""
        if task is None:
            host = self.models.named(name or "", version, client)
        else:
            host = self.models.of_task(task, name, version, client)
        if host.full():
            raise host.overloaded()
        return host

    def model_if_full(self, route: Route, name: str | None) -> ServedModel | None:
        """The model an inference route names (`name`, or the task's default), when every
        version of it that takes traffic has a full line: refused before the request is
        routed."""
        if route.task is not None:
            served = (
                self.models.models.get(name)
                if name is not None
                else self.models.default[route.task]
            )
        elif route.endpoint == "v2_infer" and name is not None:
            served = self.models.models.get(name)
        else:
            return None
        return served if served is not None and served.full() else None

    async def infer(self, host: ModelHost, images: list[Any], options: Any) -> list[Any]:
        """The model's outputs for a request's images (encoded bytes, or HWC uint8 arrays of
        RGB pixels); an image that does not decode fails the request, naming it."""
        timeout = host.config.timeout_s or self.config.request_timeout_s
        results = await host.infer([BatchItem(data, options) for data in images], timeout)
        for i, result in enumerate(results):
            if isinstance(result, ImageError):
                raise image_error(result, i, len(results))
        return results

    def pipeline(self, name: str) -> PipelineConfig:
        pipeline = self.pipelines.get(name)
        if pipeline is None:
            raise ModelNotFound(f"no pipeline {name!r}; served: {sorted(self.pipelines)}")
        return pipeline

    # ----------------------------------------------------------------------- state

    def pending(self) -> list[str]:
        return self.models.pending()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every served model is warm, and what `/readyz` says (models still training
        are listed, not waited for)."""
        training = self.models.training_status()
        extra = {"training": training} if training else {}
        pending = self.models.pending()
        if pending:
            return False, {"status": "starting", "waiting_for": pending, **extra}
        return True, {"status": "ready", "models": sorted(self.models.models), **extra}

    def listing(self) -> dict[str, Any]:
        """What `/v1/models` says: every served model version, those still training, the
        models whose last update could not be served (they serve as before), and the
        pipelines."""
        return {
            "models": [
                host.describe(served.weights[version])
                for served in self.models.models.values()
                for version, host in served.hosts.items()
            ],
            "training": self.models.training_status(),
            "update_errors": dict(self.models.update_errors),
            "pipelines": [p.model_dump() for p in self.pipelines.values()],
        }


def authorised(headers: Mapping[str, str], keys: set[str]) -> bool:
    """Whether the request carries one of the keys (`Authorization: Bearer` or `X-API-Key`;
    HTTP headers, or gRPC metadata)."""
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return (key or headers.get("x-api-key", "")) in keys
