"""Service configuration: the application args of a standard Ray Serve config file.

`deploy/serve_config.yaml` lists the server's limits under `applications[0].args` and the
models (and pipelines) under the server deployment's `user_config`; the same file works with
`convnext-serve run --config`, `serve run`, `serve deploy` and as a KubeRay `serveConfigV2`.
Environment variables override the server's settings (`CONVNEXT_SERVE_MAX_BODY_BYTES`, ...)
and every model's precision and device (`CONVNEXT_SERVE_PRECISION`, `CONVNEXT_SERVE_DEVICE`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TaskName = Literal["classify", "detect", "segment"]
DEPRECATED_GATEWAY = (
    "the serve config's `args.gateway` is now `args.server`; `gateway` is read for now and "
    "will be refused in a later version"
)
logger = logging.getLogger("ray.serve")


class VersionConfig(BaseModel):
    """One version of a model: its checkpoint and its share of the requests that name no
    version."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="the number requests use (`?version=`, `/versions/`)")
    checkpoint: str = Field(description="as a model's `checkpoint`")
    weight: float = Field(
        1.0, ge=0, description="share of the requests that name no version; 0: only those naming it"
    )


class ModelConfig(BaseModel):
    """One served model: its checkpoint (or versions), how it runs, how it batches and scales."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the name requests use (`?model=`)"
    )
    checkpoint: str | None = Field(
        None, description="path to a served `.safetensors`, or `demo:<task>`: version 1"
    )
    versions: list[VersionConfig] | None = Field(
        None,
        min_length=1,
        description="instead of `checkpoint`: several versions, each with its checkpoint and "
        "traffic weight",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16: autocast; refused at load on a CPU without native bf16"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    compile: bool = Field(False, description="torch.compile the model (compiled at warm-up)")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of a replica; default: all cores. On a CPU node, one "
        "single-threaded replica per core gives the most images/s, one replica with every "
        "core the lowest latency (docs: the serving benchmark)",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="images in one forward pass")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=10,
        description="how long a batch waits for more items after its first; under load "
        "batches fill anyway from the requests that queue while the model runs",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="default: 4x the batch size, at least 32"
    )
    max_queued_requests: int = Field(64, ge=-1, description="beyond this: 503 overloaded")
    num_replicas: int = Field(1, ge=1, description="server replicas (each hosts every model)")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve's (`min_replicas`, `max_replicas`, ...); merged over models"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs a server replica reserves")
    num_gpus: float | None = Field(None, ge=0, description="default: 1 when GPUs exist")
    warmup_batches: int = Field(2, ge=0, description="full batches run before it is ready")
    timeout_s: float | None = Field(
        None, gt=0, description="default: the server's `request_timeout_s`"
    )
    sliding_window: bool = Field(False, description="segment: sliding-window inference")
    gpu_decode: bool = Field(
        True,
        description="on a CUDA device, decode plain JPEGs on the GPU (nvJPEG); false: "
        "Pillow on the CPU, as CPU replicas do",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.checkpoint is None) == (self.versions is None):
            raise ValueError(f"model {self.name!r}: give `checkpoint` or `versions`, one of them")
        if self.versions is not None:
            numbers = [v.version for v in self.versions]
            if len(numbers) != len(set(numbers)):
                raise ValueError(f"model {self.name!r}: versions must be unique: {numbers}")
            if not any(v.weight > 0 for v in self.versions):
                raise ValueError(f"model {self.name!r}: at least one version needs a weight over 0")
        return self

    def served_versions(self) -> list[VersionConfig]:
        """Its versions; the short form (`checkpoint`) is version 1."""
        if self.versions is not None:
            return list(self.versions)
        return [VersionConfig(version=1, checkpoint=self.checkpoint)]

    def of_version(self, version: VersionConfig) -> ModelConfig:
        """The settings one version runs with: the model's, with that version's checkpoint."""
        return self.model_copy(update={"checkpoint": version.checkpoint, "versions": None})

    @property
    def max_replicas(self) -> int:
        if self.autoscaling_config:
            return int(self.autoscaling_config.get("max_replicas", 1))
        return self.num_replicas

    @property
    def ongoing(self) -> int:
        # Requests beyond this wait in the caller's router, which retries with backoff and
        # leaves the model idle; held in the replica they cost nothing and join the next batch.
        return self.max_ongoing_requests or max(32, 4 * self.max_batch_size)


class ServerConfig(BaseSettings):
    """HTTP-side limits; each may come from a `CONVNEXT_SERVE_<FIELD>` environment variable."""

    model_config = SettingsConfigDict(env_prefix="CONVNEXT_SERVE_", extra="forbid")

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="413 beyond")
    max_pixels: int = Field(40_000_000, ge=1, description="per image, from its header; 413 beyond")
    max_images_per_request: int = Field(32, ge=1, description="422 beyond")
    request_timeout_s: float = Field(30.0, gt=0, description="504 beyond, unless the model's")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive within this (408 beyond)"
    )
    max_in_flight: int = Field(256, ge=1, description="beyond this: 503 overloaded")
    api_keys_env: str = Field(
        "CONVNEXT_SERVE_API_KEYS", description="comma-separated keys; unset: no auth"
    )
    admin_keys_env: str = Field(
        "CONVNEXT_SERVE_ADMIN_KEYS",
        description="comma-separated keys of the model repository API; unset: the API is off",
    )
    model_roots: list[str] = Field(
        default_factory=list,
        description="folders the repository API may load checkpoints from (symlinks resolved)",
    )
    repository_timeout_s: float = Field(
        600.0, gt=0, description="how long a repository load or unload waits for every replica"
    )
    num_replicas: int = Field(1, ge=1, description="server replicas, at least")
    autoscaling_config: dict[str, Any] | None = Field(
        None,
        description="Ray Serve's autoscaling of the server replicas (`min_replicas`, "
        "`max_replicas`, `target_ongoing_requests`, ...); the models' own merge over it",
    )
    num_cpus: float = Field(0.5, ge=0, description="CPUs a server replica reserves, at least")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs a server replica reserves; default: 1 when GPUs exist"
    )
    retry_after_s: int = Field(1, ge=1, description="the Retry-After of a 503 overloaded")


class TrainingModel(BaseModel):
    """A model not served yet because it is still training: shown, with the progress its
    training writes (`models.train.progress`), in /readyz and /v1/models; requests for it get
    503 `model_training`. `convnext-serve run` lists here the demo models it trains in the
    background, each with `serve_as`: the replicas load it once its training is done."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="as a model's")
    task: TaskName = Field(description="classify, detect or segment")
    progress_file: str = Field(description="the JSON file the training writes its progress to")
    serve_as: ModelConfig | None = Field(
        None,
        description="the model to serve once its progress says done: each replica loads and "
        "warms it up in place (no restart), then serves it",
    )

    @model_validator(mode="after")
    def _same_name(self) -> TrainingModel:
        if self.serve_as is not None and self.serve_as.name != self.name:
            raise ValueError(f"serve_as names {self.serve_as.name!r}, not {self.name!r}")
        return self


class PipelineStep(BaseModel):
    """A pipeline's second model, run on the crop of each box of the detector's `classes`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a served classify or segment model")
    classes: list[str] | None = Field(
        None, description="the detector's labels it runs on; default: every label"
    )
    top_k: int = Field(5, ge=1, le=1000, description="a classifier's classes per box")


class PipelineConfig(BaseModel):
    """A chain in one request: the detector finds the objects, and each box's crop of the
    decoded image goes to the first step that takes the box's label, batched with the other
    requests of that model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the name requests use (`/v1/pipelines/{name}`); not a model's",
    )
    detector: str = Field(description="a served detect model")
    steps: list[PipelineStep] = Field(
        min_length=1, description="second models; a box goes to the first that takes its label"
    )
    score_threshold: float = Field(0.5, ge=0, le=1, description="the detector's")
    max_boxes: int = Field(
        16,
        ge=1,
        le=1000,
        description="boxes an image sends on, the highest scored (the others are answered "
        "without a second model)",
    )
    margin: float = Field(
        0.1, ge=0, le=2, description="context around a box: this fraction of its size, each side"
    )
    max_crop_pixels: int = Field(
        16_000_000,
        ge=1,
        description="pixels of a request's crops, in score order; a box beyond is answered "
        "with a reason instead",
    )


def check_pipelines(pipelines: list[PipelineConfig], models: list[str]) -> None:
    """Each pipeline's models are served, its name is its own; a clear error naming the
    field otherwise (the tasks are checked where the models are loaded)."""
    names = [p.name for p in pipelines]
    for i, p in enumerate(pipelines):
        where = f"pipelines[{i}] ({p.name!r})"
        if p.name in models:
            raise ValueError(f"{where}.name: {p.name!r} is also a model's name")
        if names.count(p.name) > 1:
            raise ValueError(f"{where}.name: pipeline names must be unique")
        fields = [("detector", p.detector)]
        fields += [(f"steps[{j}].model", s.model) for j, s in enumerate(p.steps)]
        for field, model in fields:
            if model in names:  # chains of pipelines could loop; one detector and its steps
                raise ValueError(
                    f"{where}.{field}: {model!r} is a pipeline; a pipeline runs models, "
                    "not other pipelines"
                )
            if model not in models:
                raise ValueError(f"{where}.{field}: no model {model!r} is configured")


class AppConfig(BaseModel):
    """The application args: the models and the server replica's limits (`server`; the
    deprecated name `gateway` is still read). The models may come instead (or later) from the
    server deployment's `user_config` (`served_models`), which Serve updates in place."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=list)
    training: list[TrainingModel] = Field(default_factory=list)
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in [*self.models, *self.training]]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique: {names}")
        if self.models or self.training:  # else the models come with the user_config
            check_pipelines(self.pipelines, names)
        return self

    def every_model(self) -> list[ModelConfig]:
        """The models served now and those served once trained (`serve_as`): what a replica's
        resources, limits and shutdown are sized for."""
        return [*self.models, *(t.serve_as for t in self.training if t.serve_as is not None)]

    def longest_request_s(self) -> float:
        """The longest a request may take: what a stopping replica waits for."""
        timeouts = (m.timeout_s or 0 for m in self.every_model())
        return max([self.server.request_timeout_s, *timeouts])

    def server_capacity(self) -> int:
        """The API requests a server replica holds before it surely refuses more (503): its
        in-flight limit, or every model version's calls and waiting line where those are
        bounded and fewer. HAProxy refuses beyond it (`service.haproxy_front`)."""
        models = self.every_model()
        if any(m.max_queued_requests < 0 for m in models):
            return self.server.max_in_flight
        lines = sum((m.ongoing + m.max_queued_requests) * len(m.served_versions()) for m in models)
        return min(self.server.max_in_flight, lines)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AppConfig:
        """From a serve config's `args`, with the environment's overrides applied."""
        args = dict(args)
        if "gateway" in args:  # the first name of `server`, from when it was a deployment
            if "server" in args:
                raise ValueError("args has `server` and `gateway` (its old name): keep `server`")
            warnings.warn(DEPRECATED_GATEWAY, DeprecationWarning, stacklevel=2)
            logger.warning(DEPRECATED_GATEWAY)
            args["server"] = args.pop("gateway")
        from_env = ServerConfig().model_dump(exclude_unset=True)  # only what the env sets
        server = ServerConfig(**{**(args.pop("server", None) or {}), **from_env})
        config = cls(server=server, **args)
        config.models, config.training = with_env_overrides(config.models, config.training)
        return config


def with_env_overrides(
    models: list[ModelConfig], training: list[TrainingModel]
) -> tuple[list[ModelConfig], list[TrainingModel]]:
    """The models with the environment's precision and device (`CONVNEXT_SERVE_PRECISION`,
    `CONVNEXT_SERVE_DEVICE`), where set."""
    override = {
        key: os.environ[f"CONVNEXT_SERVE_{key.upper()}"]
        for key in ("precision", "device")
        if os.environ.get(f"CONVNEXT_SERVE_{key.upper()}")
    }
    if not override:
        return models, training

    def overridden(m: ModelConfig) -> ModelConfig:
        return m.model_validate({**m.model_dump(), **override})

    for t in training:
        if t.serve_as is not None:
            t.serve_as = overridden(t.serve_as)
    return [overridden(m) for m in models], training


# A model's settings that size the server replicas (its resources and how many): read from
# `args` when the application is built; a `user_config` cannot change them.
SIZING = {"num_replicas", "autoscaling_config", "num_cpus", "num_gpus"}


def served_models(user_config: dict[str, Any]) -> tuple[list[ModelConfig], list[TrainingModel]]:
    """The models of the server deployment's `user_config` (`{"models": [...], "training":
    [...]}`, as `args` lists them), with the environment's overrides."""
    unknown = set(user_config) - {"models", "training", "pipelines"}
    if unknown:
        raise ValueError(
            f"the server's user_config takes `models`, `training` and `pipelines`, not {unknown}"
        )
    models = [ModelConfig.model_validate(m) for m in user_config.get("models") or []]
    training = [TrainingModel.model_validate(t) for t in user_config.get("training") or []]
    for m in [*models, *(t.serve_as for t in training if t.serve_as is not None)]:
        sizing = sorted(m.model_fields_set & SIZING)
        if sizing:
            raise ValueError(
                f"model {m.name!r}: {', '.join(sizing)} size the replicas, which an in-place "
                "update cannot change: set them under `args.server`"
            )
    names = [m.name for m in [*models, *training]]
    if len(names) != len(set(names)):
        raise ValueError(f"model names must be unique: {names}")
    if not names:
        raise ValueError(
            "no models: list them under the application's `args.models`, or under the `server` "
            "deployment's `user_config.models` (updated in place)"
        )
    return with_env_overrides(models, training)


def served_pipelines(
    user_config: dict[str, Any], models: list[ModelConfig], training: list[TrainingModel]
) -> list[PipelineConfig]:
    """The pipelines of the server deployment's `user_config`, over its models (those
    `served_models` read from it)."""
    pipelines = [PipelineConfig.model_validate(p) for p in user_config.get("pipelines") or []]
    check_pipelines(pipelines, [m.name for m in [*models, *training]])
    return pipelines


def check_pipeline_tasks(pipelines: list[PipelineConfig], tasks: dict[str, str]) -> None:
    """Each pipeline's detector detects and its steps classify or segment, by the tasks of
    the models served (`tasks`: name -> task); a clear error naming the field otherwise."""
    for i, p in enumerate(pipelines):
        fields = [("detector", p.detector, ("detect",))]
        fields += [
            (f"steps[{j}].model", s.model, ("classify", "segment")) for j, s in enumerate(p.steps)
        ]
        for field, model, wanted in fields:
            task = tasks.get(model)
            if task is not None and task not in wanted:
                raise ValueError(
                    f"pipelines[{i}] ({p.name!r}).{field}: {model!r} is a {task} model, not "
                    + " or ".join(wanted)
                )


def read_serve_config(path: str | Path) -> dict[str, Any]:
    """A Ray Serve config file (YAML) as a dict."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not data.get("applications"):
        raise ValueError(f"{path}: not a Ray Serve config (no 'applications' list)")
    return data


IMPORT_PATH = "service.app:build_app"  # the application builder a serve config names


def model_lists(app: dict[str, Any]) -> dict[str, Any]:
    """Where a serve config's application lists its models (`models`, `training`): the server
    deployment's `user_config` where it has one, else `args`; the dict itself, to edit."""
    for deployment in app.get("deployments") or []:
        if deployment.get("name") == "server" and deployment.get("user_config"):
            return deployment["user_config"]
    return app.setdefault("args", {})


def app_configs(config: dict[str, Any]) -> list[AppConfig]:
    """The args of a serve config's convnext-serve applications, in order, each with the
    models of its server deployment's `user_config` where that lists them."""
    configs = []
    for app in config["applications"]:
        if app.get("import_path") != IMPORT_PATH:
            continue
        found = AppConfig.from_args(app.get("args") or {})
        lists = model_lists(app)
        if lists is not app.get("args"):
            found.models, found.training = served_models(lists)
            found.pipelines = served_pipelines(lists, found.models, found.training)
        configs.append(found)
    return configs


# Ray Serve logs a line per request by default; that took a tenth of a replica's event loop
# time per request. The metrics count and time every request; `true` turns the lines back on.
LOGGING_CONFIG = {"enable_access_log": False}


def app_serve_config(models: list[dict[str, Any]], **http: Any) -> dict[str, Any]:
    """A serve config of this service's application with `models` (`http`: http_options)."""
    app = {
        "name": "convnext-serve",
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "logging_config": dict(LOGGING_CONFIG),
        "args": {"models": models},
    }
    return {**({"http_options": http} if http else {}), "applications": [app]}


def pretrained_serve_config(names: list[str]) -> dict[str, Any]:
    """The config of `convnext-serve run --pretrained NAME ...`: the official releases. The
    released detectors take batches of 2 (800 x 1333 images), the segmenters slide their window
    over the image, as the paper evaluates them."""
    from models.convert_dense import DENSE_RELEASES
    from models.registry import model_task

    models = []
    for name in names:
        model: dict[str, Any] = {"name": name, "checkpoint": f"pretrained:{name}"}
        if name in DENSE_RELEASES:
            task = model_task(DENSE_RELEASES[name].arch)
            model.update({"max_batch_size": 2} if task == "detect" else {"sliding_window": True})
        models.append(model)
    return app_serve_config(models)


def demo_serve_config(port: int = 8000, host: str = "127.0.0.1") -> dict[str, Any]:
    """The config `convnext-serve run` uses without --config: the three demo models, and the
    pipeline of the detector and the classifier."""
    models = [
        {"name": "shapes-classifier", "checkpoint": "demo:classify"},
        {"name": "shapes-detector", "checkpoint": "demo:detect", "max_batch_size": 4},
        {"name": "shapes-segmenter", "checkpoint": "demo:segment", "max_batch_size": 4},
    ]
    config = app_serve_config(models, host=host, port=port)
    config["applications"][0]["args"]["pipelines"] = [DEMO_PIPELINE]
    return config


# the demo pipeline (also in deploy/serve_config.yaml): each box the detector finds, classified
DEMO_PIPELINE = {
    "name": "shapes-inside-boxes",
    "detector": "shapes-detector",
    "steps": [{"model": "shapes-classifier", "top_k": 3}],
}
