"""The Ray Serve application: one deployment, `server`, whose replicas take HTTP themselves and
host every served model.

`build_app(args)` is the application builder a Serve config names
(`import_path: service.app:build_app`). A request enters a server replica straight from Serve's
HAProxy front, and its image bytes go into the model's batch queue in the same process: there
is no second deployment to call, no serialisation, no second event loop per request. The
replica decodes, preprocesses and runs each batch (on the GPU where it has one); a replica is
to the service what a Triton server instance is to Triton, and replicas scale as a whole.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

import torch
from fastapi import Request
from pydantic import ValidationError
from ray import serve

from models.images import ImageError
from models.train.progress import read_progress

from .body import read_images
from .config import AppConfig, GatewayConfig, ModelConfig, TrainingModel
from .errors import ModelNotFound, ModelTraining, image_error
from .grpc_api import GrpcInference
from .host import ModelHost
from .metrics import gateway_metrics
from .protocol import VERSION
from .routes import api, attach
from .runtime import Entry
from .schemas import TrainingProgress


@serve.deployment
@serve.ingress(api)
class Server(GrpcInference):
    """A server replica: the HTTP API (`service.routes`) and the protocol's gRPC methods
    (`service.grpc_api`) over the models it hosts."""

    def __init__(self, gateway: dict, models: list[dict], training: list[dict] | None = None):
        self.config = GatewayConfig.model_validate(gateway)
        configs = [ModelConfig.model_validate(m) for m in models]
        self.training = [TrainingModel.model_validate(t) for t in training or []]
        self.join_errors: dict[str, str] = {}  # trained models that could not be served
        # Loading is quick and a bad checkpoint fails the replica here; warm-up runs in the
        # background, so /healthz answers and /readyz says what is still warming.
        self.hosts = {
            c.name: ModelHost(c, self.config.max_pixels, self.config.retry_after_s) for c in configs
        }
        # a model trained before this replica started is served as if configured
        for t in [t for t in self.training if _trained(t)]:
            host = self._load_trained(t)
            if host is not None:
                self.hosts[t.name] = host
                self.training = [other for other in self.training if other is not t]
        for host in self.hosts.values():
            host.start_warmup()
        keys = os.environ.get(self.config.api_keys_env, "")
        self.api_keys = {k.strip() for k in keys.split(",") if k.strip()}
        # each task's default model: the first configured
        self.default = {
            task: next((h for h in self.hosts.values() if h.meta.task == task), None)
            for task in TASK_PATHS.values()
        }
        self.metrics = gateway_metrics()
        self.in_flight: dict[str, int] = {}  # by endpoint, counted by the guard
        # API requests by (endpoint, model, status) since the guard's task last counted them
        self.request_counts: dict[tuple[str, str, str], int] = {}
        self.in_flight_reporter = None  # the guard's task that reports both every second
        attach(self)  # for the middleware and the routes
        if self._joinable():
            threading.Thread(target=self._join_when_trained, name="join", daemon=True).start()

    def _joinable(self) -> list[TrainingModel]:
        return [t for t in self.training if t.serve_as and t.name not in self.join_errors]

    def _load_trained(self, t: TrainingModel) -> ModelHost | None:
        """The host of a trained model; None, with the reason kept for /v1/models, when it
        cannot be loaded: the replica keeps serving the others."""
        try:
            return ModelHost(t.serve_as, self.config.max_pixels, self.config.retry_after_s)
        except Exception as e:
            logger.exception("model %r was trained but cannot be served", t.name)
            self.join_errors[t.name] = f"trained, but cannot be served: {e!r}"
            return None

    def _join_when_trained(self) -> None:
        """Serve each model of `training` that has `serve_as` once its training says done:
        loaded and warmed up here beside the models being served (a redeploy would restart
        the replica and warm every model again), then listed with them."""
        while self._joinable():
            time.sleep(JOIN_POLL_S)
            for t in [t for t in self._joinable() if _trained(t)]:
                host = self._load_trained(t)
                if host is None:
                    continue
                host.start_warmup()
                try:
                    host.warm.result()
                except Exception as e:
                    self.join_errors[t.name] = f"trained, but failed to warm up: {e!r}"
                    continue
                # published whole, for the event loop reading them
                self.hosts = {**self.hosts, t.name: host}
                if self.default.get(host.meta.task) is None:
                    self.default = {**self.default, host.meta.task: host}
                self.training = [other for other in self.training if other is not t]
                logger.info("model %r trained: now served", t.name)

    def check_health(self) -> None:
        """Serve restarts a replica whose model failed to warm up."""
        for host in self.hosts.values():
            error = host.failure()
            if error is not None:
                raise RuntimeError(f"model {host.name!r} failed to warm up: {error!r}")

    def pending_models(self) -> list[str]:
        return sorted(name for name, host in self.hosts.items() if not host.ready)

    def training_status(self) -> list[dict[str, Any]]:
        """The models still training, each with the progress its training last wrote."""
        return [_progress(t, self.join_errors.get(t.name)).model_dump() for t in self.training]

    def _refuse_training(self, task: str | None, name: str | None) -> None:
        """503 `model_training` for a model still training: the one named, or the task's."""
        for t in self.training:
            if (t.name == name or name is None) and task in (None, t.task):
                progress = _progress(t)
                done = "" if progress.fraction is None else f" ({progress.fraction:.0%} done)"
                raise ModelTraining(
                    f"model {t.name!r} is still training{done}; it is served once trained",
                    30 if progress.eta_s is None else int(min(max(progress.eta_s, 1), 600)),
                )

    def model_named(self, name: str, version: str | None = None) -> ModelHost:
        """A model by its name (and protocol version, where given), of any task."""
        host = self.hosts.get(name)
        if host is None:
            self._refuse_training(None, name)
            raise ModelNotFound(f"no model {name!r}; served: {sorted(self.hosts)}")
        if version and version != VERSION:
            raise ModelNotFound(f"model {name!r} has version {VERSION!r} only, not {version!r}")
        return host

    def model_for(
        self, request: Request, task: str | None, name: str | None, version: str | None = None
    ) -> ModelHost:
        """The model a request names (default: the first of the task; `task` None: a model of
        any task, by name and version), refused with 503 when its line is full, before the
        body is read."""
        if task is None:
            host = self.model_named(name or "", version)
        elif name is None:
            host = self.default[task]
            if host is None:
                self._refuse_training(task, None)
                raise ModelNotFound(f"no {task} model is served")
        else:
            host = self.hosts.get(name)
            if host is None:
                self._refuse_training(task, name)
            if host is None or host.meta.task != task:
                served = [n for n, h in self.hosts.items() if h.meta.task == task]
                raise ModelNotFound(f"no {task} model {name!r}; served: {served}")
        request.state.model = host.name
        if host.full():
            raise host.overloaded()
        return host

    def full_model(self, path: str, query: bytes) -> ModelHost | None:
        """The model an inference request names, when its line is full; from the path and
        query alone, so the guard refuses it before FastAPI routes it (half the cost of a
        refusal in the route, which counts when a burst of them holds the event loop)."""
        if path in TASK_PATHS:
            name = _query_value(query, b"model")
            host = self.hosts.get(name) if name is not None else self.default[TASK_PATHS[path]]
        elif path.startswith("/v2/models/") and path.endswith("/infer"):
            host = self.hosts.get(unquote(path.split("/")[3]))
        else:
            return None
        return host if host is not None and host.full() else None

    async def images(self, request: Request, single: bool = False) -> list[bytes]:
        return await read_images(request, self.config, single)

    async def run(self, host: ModelHost, images: list[Any], options: Any) -> list[Any]:
        """The model's outputs for the request's images (encoded bytes, or HWC uint8 arrays
        of RGB pixels); a bad image fails the request."""
        timeout = host.config.timeout_s or self.config.request_timeout_s
        results = await host.run([Entry(data, options) for data in images], timeout)
        for i, result in enumerate(results):
            if isinstance(result, ImageError):
                raise image_error(result, i, len(results))
        return results


TASK_PATHS = {f"/v1/{task}": task for task in ("classify", "detect", "segment")}
JOIN_POLL_S = 1.0  # how often a replica looks for a model that finished training
logger = logging.getLogger("ray.serve")


def _trained(model: TrainingModel) -> bool:
    """Whether a model to serve once trained has finished: its training writes "done" once the
    checkpoint is complete."""
    return model.serve_as is not None and read_progress(model.progress_file).get("state") == "done"


def _progress(model: TrainingModel, join_error: str | None = None) -> TrainingProgress:
    """What a model's training last wrote, as documented (other fields left out); a file that
    is not what a training run writes reads as waiting; `join_error`: failed after all."""
    named = {"name": model.name, "task": model.task}
    if join_error is not None:
        return TrainingProgress(state="failed", error=join_error, **named)
    try:
        return TrainingProgress.model_validate({**read_progress(model.progress_file), **named})
    except ValidationError:
        return TrainingProgress(state="waiting", **named)


def _query_value(query: bytes, key: bytes) -> str | None:
    """The last value of `key` in a query string (FastAPI's choice), without parsing the rest."""
    if key + b"=" not in query:
        return None
    values = [
        v
        for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        if k == key.decode()
    ]
    return values[-1] if values else None


# ----------------------------------------------------------------------------- the builder


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application from a serve config's args (models and gateway settings)."""
    config = AppConfig.from_args(args)
    gateway = config.gateway
    options: dict[str, Any] = {
        "name": "server",
        "max_ongoing_requests": gateway.max_in_flight + 64,  # the guard answers 503 beyond
        # A stopping replica finishes what it holds (checked every 0.2 s, not Serve's 2 s).
        "graceful_shutdown_wait_loop_s": 0.2,
        "graceful_shutdown_timeout_s": config.longest_request_s() + 5,
        "ray_actor_options": {
            "num_cpus": max([gateway.num_cpus, *(m.num_cpus for m in config.every_model())]),
            "num_gpus": _gpus_per_replica(config),
        },
    }
    autoscaling = server_autoscaling(config)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = max(
            [gateway.num_replicas, *(m.num_replicas for m in config.every_model())]
        )
    return Server.options(**options).bind(
        gateway.model_dump(),
        [m.model_dump() for m in config.models],
        [t.model_dump() for t in config.training],
    )


def server_autoscaling(config: AppConfig) -> dict[str, Any] | None:
    """The server's autoscaling from its models': a replica holds every model, so it scales
    between the largest minimum and maximum, and its target of requests in flight is the sum
    of the models' targets."""
    configs = [m.autoscaling_config for m in config.every_model() if m.autoscaling_config]
    if not configs:
        return None
    merged = {k: v for c in configs for k, v in c.items()}
    merged["min_replicas"] = max(
        [config.gateway.num_replicas, *(int(c.get("min_replicas", 1)) for c in configs)]
    )
    merged["max_replicas"] = max(int(c.get("max_replicas", 1)) for c in configs)
    targets = [c["target_ongoing_requests"] for c in configs if "target_ongoing_requests" in c]
    if targets:
        merged["target_ongoing_requests"] = sum(targets)
    return merged


def _gpus_per_replica(config: AppConfig) -> float:
    """A replica's GPUs: the most any model asks for, or one whole GPU when the cluster has
    GPUs (or a model is forced onto CUDA) and no model says.

    Decided from the cluster's resources, not this process's devices: on KubeRay the app is
    built on a head node without GPUs while the replicas run on GPU workers.
    """
    import ray

    models = config.every_model()
    asked = [m.num_gpus for m in models if m.num_gpus is not None]
    if asked:
        return max(asked)
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if not gpus and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
    forced = any(m.device == "cuda" for m in models)
    on_gpu = any(m.device != "cpu" for m in models)
    return 1.0 if (gpus or forced) and on_gpu else 0.0
