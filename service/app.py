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
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve

from .config import (
    SIZING,
    AppConfig,
    ServerConfig,
    check_pipeline_tasks,
    served_models,
    served_pipelines,
)
from .data_plane import DataPlane
from .grpc_api import GrpcInference
from .repository import RepositoryState, RepositorySync
from .routes import make_api
from .served_models import ServedModels

logger = logging.getLogger("ray.serve")
HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives its head node alone


@serve.deployment
@serve.ingress()
class Server(GrpcInference):
    """A server replica: its models (`service.served_models`), the data plane every protocol
    calls (`service.data_plane`), the HTTP app over it (`service.routes.make_api`, built by
    Serve on the replica) and the protocol's gRPC methods (`service.grpc_api`)."""

    def __init__(self, server: dict):
        config = ServerConfig.model_validate(server)
        served = ServedModels([], [], config)  # the models come with `reconfigure`
        keys, admin = _keys(config.api_keys_env), frozenset(_keys(config.admin_keys_env))
        self.plane = DataPlane(config, served, keys, admin)
        state, replica = repository_state()
        self.plane.repository = RepositorySync(served, state, replica)
        self._configured = False

    def reconfigure(self, user_config: dict) -> None:
        """The models, from the deployment's `user_config`. Serve calls this once before the
        replica takes requests, where the models load (a bad checkpoint fails the replica), and
        again, without restarting the replica, for a deploy whose change is only the
        `user_config`: then they are swapped in place, in the background
        (`ServedModels.update`, from the replica's `RepositorySync`, which also applies the
        model repository's changes). A later `user_config` that is not valid is refused (and
        listed under `update_errors`) while the models serve as they were."""
        if not self._configured:
            models, training = served_models(user_config)
            pipelines = served_pipelines(user_config, models, training)
            self.plane.models.start(models, training)
            check_pipeline_tasks(pipelines, self._tasks(training))
            self.plane.pipelines = {p.name: p for p in pipelines}
            self.plane.repository.start_from(models, training)
            self._configured = True
            return
        try:
            models, training = served_models(user_config)
            pipelines = served_pipelines(user_config, models, training)
            check_pipeline_tasks(pipelines, self._tasks(training))
        except ValueError as e:  # pydantic's ValidationError is one
            logger.error("the server's new user_config is refused: %s", e)
            self.plane.models.update_errors = {"user_config": f"refused: {e}"}
            return
        # the pipelines change at once: a model of theirs not served yet answers as such
        self.plane.pipelines = {p.name: p for p in pipelines}
        self.plane.repository.configure(models, training)

    def _tasks(self, training: list) -> dict[str, str]:
        """The task of each model served or training (a new config's models not loaded yet
        are checked once they serve)."""
        tasks = {name: served.meta.task for name, served in self.plane.models.models.items()}
        return {**tasks, **{t.name: t.task for t in training}}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.plane)

    def check_health(self) -> None:
        """Serve restarts a replica whose model failed to warm up."""
        for label, error in self.plane.models.failures().items():
            raise RuntimeError(f"{label} failed to warm up: {error!r}")


def _keys(env: str) -> set[str]:
    """The comma-separated keys of an environment variable."""
    return {k.strip() for k in os.environ.get(env, "").split(",") if k.strip()}


def repository_state() -> tuple[Any, str]:
    """The application's model repository state, one Ray actor its replicas share (made by
    the first), and this replica's id; outside a Serve replica, a plain object of its own."""
    try:
        context = serve.get_replica_context()
    except Exception:  # not in a replica: Serve raises its own exception type
        return RepositoryState(), "local"
    import ray

    # On the head node, as Serve's controller: the repository's changes outlive the loss of
    # any worker node, which an actor there would take with it. (Ray's own libraries place
    # their state actors so; a soft node affinity to the head was not kept.)
    actor = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001})(RepositoryState).options(
        name=f"convnext-serve-repository:{context.app_name}",
        namespace="convnext-serve",
        lifetime="detached",
        get_if_exists=True,
    )
    return actor.remote(), context.replica_id.unique_id


# ----------------------------------------------------------------------------- the builder


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application from a serve config's args (models and the server's settings)."""
    config = AppConfig.from_args(args)
    limits = config.server
    options: dict[str, Any] = {
        "name": "server",
        "max_ongoing_requests": limits.max_in_flight + 64,  # the guard answers 503 beyond
        # A stopping replica finishes what it holds (checked every 0.2 s, not Serve's 2 s).
        "graceful_shutdown_wait_loop_s": 0.2,
        "graceful_shutdown_timeout_s": config.longest_request_s() + 5,
        "ray_actor_options": {
            "num_cpus": max([limits.num_cpus, *(m.num_cpus for m in config.every_model())]),
            "num_gpus": _gpus_per_replica(config),
        },
    }
    autoscaling = server_autoscaling(config)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = max(
            [limits.num_replicas, *(m.num_replicas for m in config.every_model())]
        )
    # The models travel as the deployment's user_config, which a config's `deployments:` entry
    # for `server` may set instead: Serve hands a change of it to the running replicas
    # (`Server.reconfigure`). A change of `args` is a new version of the application's code
    # to Serve, which replaces the replicas.
    # (Without what sized the replicas above, which a user_config may not set.)
    options["user_config"] = {
        "models": [m.model_dump(mode="json", exclude=SIZING) for m in config.models],
        "training": [
            t.model_dump(mode="json", exclude={"serve_as": SIZING}) for t in config.training
        ],
        "pipelines": [p.model_dump(mode="json") for p in config.pipelines],
    }
    return Server.options(**options).bind(limits.model_dump(mode="json"))


def server_autoscaling(config: AppConfig) -> dict[str, Any] | None:
    """The server's autoscaling from its models': a replica holds every model, so it scales
    between the largest minimum and maximum, and its target of requests in flight is the sum
    of the models' targets."""
    configs = [config.server.autoscaling_config]
    configs += [m.autoscaling_config for m in config.every_model()]
    configs = [c for c in configs if c]
    if not configs:
        return None
    merged = {k: v for c in configs for k, v in c.items()}
    merged["min_replicas"] = max(
        [config.server.num_replicas, *(int(c.get("min_replicas", 1)) for c in configs)]
    )
    merged["max_replicas"] = max(int(c.get("max_replicas", 1)) for c in configs)
    targets = [c["target_ongoing_requests"] for c in configs if "target_ongoing_requests" in c]
    if targets:
        merged["target_ongoing_requests"] = sum(targets)
    return merged


def _gpus_per_replica(config: AppConfig) -> float:
    """A replica's GPUs: the most the server or any model asks for, or one whole GPU when the
    cluster has GPUs (or a model is forced onto CUDA) and none says. Models that come with
    the `user_config` are not known yet: they run where the device is left to them.

    Decided from the cluster's resources, not this process's devices: on KubeRay the app is
    built on a head node without GPUs while the replicas run on GPU workers.
    """
    import ray

    models = config.every_model()
    asked = [g for g in [config.server.num_gpus, *(m.num_gpus for m in models)] if g is not None]
    if asked:
        return max(asked)
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if not gpus and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
    forced = any(m.device == "cuda" for m in models)
    if models:
        on_gpu = any(m.device != "cpu" for m in models)
    else:
        on_gpu = os.environ.get("CONVNEXT_SERVE_DEVICE", "auto") != "cpu"
    return 1.0 if (gpus or forced) and on_gpu else 0.0
