"""What the Open Inference Protocol calls a model: a served model's version, or a pipeline.

REST (`service.v2`) and gRPC (`service.grpc_api`) resolve a request's model name here and
then treat both alike: its metadata, its readiness, and its output tensors for a request's
images and `parameters`. A pipeline is a model of platform `convnext-serve_pipeline`, version
"1", with the models' inputs and outputs of its own (`service.pipelines.tensor_outputs`).
"""

from __future__ import annotations

from typing import Any

from . import protocol
from .config import PipelineConfig
from .data_plane import DataPlane
from .errors import ModelNotFound
from .host import ModelHost
from .pipelines import PLATFORM, VERSION, run_pipeline, tensor_outputs, tensors


class ModelTarget:
    """A served model's version, as the protocol runs it: the task's options from the
    request's parameters, the task's tensors out."""

    def __init__(self, plane: DataPlane, host: ModelHost):
        self.plane, self.host = plane, host
        self.name, self.version = host.name, host.version

    def admit(self) -> None:
        """Refuse the request (503) when the version's line is full, before its tensors are
        read."""
        if self.host.full():
            raise self.host.overloaded()

    def datatypes(self) -> dict[str, str]:
        return {n: d for n, d, _ in self.host.task.tensor_outputs(self.host.meta)}

    async def infer(self, images: list[Any], parameters: dict[str, Any]) -> dict[str, Any]:
        host = self.host
        options = host.task.options_from(parameters)
        outputs = await self.plane.infer(host, images, options)
        return host.task.tensors(host.meta, outputs, options)


class PipelineTarget:
    """A pipeline, as the protocol runs it: the detector's boxes and each box's second model
    answer as tensors. It takes no parameters; its config sets the threshold and bounds."""

    version = VERSION

    def __init__(self, plane: DataPlane, pipeline: PipelineConfig, client: str | None):
        self.plane, self.pipeline, self.client = plane, pipeline, client
        self.name = pipeline.name
        self.tasks = step_tasks(plane, pipeline)

    def admit(self) -> None:
        """Nothing to refuse yet: the detector's line is checked as the pipeline runs."""

    def datatypes(self) -> dict[str, str]:
        return {n: d for n, d, _ in tensor_outputs(self.pipeline, self.tasks)}

    async def infer(self, images: list[Any], parameters: dict[str, Any]) -> dict[str, Any]:
        answer = await run_pipeline(self.plane, self.pipeline, images, self.client)
        return tensors(self.pipeline, self.tasks, answer)


def target(
    plane: DataPlane, name: str, version: str | None, client: str | None
) -> ModelTarget | PipelineTarget:
    """The model a protocol request names: the version named, else one drawn by weight
    (sticky per `client`), or a pipeline."""
    pipeline = plane.pipelines.get(name)
    if pipeline is None:
        return ModelTarget(plane, plane.models.named(name, version, client))
    _check_version(pipeline, version)
    return PipelineTarget(plane, pipeline, client)


def metadata(plane: DataPlane, name: str, version: str | None) -> dict[str, Any]:
    """`ModelMetadata`'s fields of a model (the version named, else one drawn) or a pipeline."""
    pipeline = plane.pipelines.get(name)
    if pipeline is None:
        served = plane.models.served(name)
        host = served.version(version) if version else served.choose()
        return protocol.model_metadata(served.name, served.numbers(), host.task, host.meta)
    _check_version(pipeline, version)
    tasks = step_tasks(plane, pipeline)
    parameters = {
        "task": "pipeline",
        "detector": pipeline.detector,
        "steps": [{**s.model_dump(), "task": tasks[s.model]} for s in pipeline.steps],
    }
    outputs = tensor_outputs(pipeline, tasks)
    return protocol.metadata(pipeline.name, [VERSION], PLATFORM, outputs, parameters)


def readiness(plane: DataPlane, name: str, version: str | None) -> tuple[str, bool]:
    """The model's name, and whether the version named, or every version, is warm (a
    pipeline: every version of each of its models); unknown names and versions are a 404."""
    pipeline = plane.pipelines.get(name)
    if pipeline is not None:
        _check_version(pipeline, version)
        names = [pipeline.detector, *(s.model for s in pipeline.steps)]
        models = [plane.models.models.get(n) for n in names]
        hosts = [h for served in models if served for h in served.hosts.values()]
        return name, all(models) and all(h.ready for h in hosts)
    served = plane.models.served(name)
    hosts = [served.version(version)] if version else list(served.hosts.values())
    return served.name, all(h.ready for h in hosts)


def step_tasks(plane: DataPlane, pipeline: PipelineConfig) -> dict[str, str]:
    """The task of each model a pipeline's steps name (checked when the pipeline was served)."""
    return {s.model: plane.models.served(s.model).task.name for s in pipeline.steps}


def _check_version(pipeline: PipelineConfig, version: str | None) -> None:
    if version and version != VERSION:
        raise ModelNotFound(
            f"pipeline {pipeline.name!r} has no version {version!r}; it has [{VERSION!r}]"
        )
