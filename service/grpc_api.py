"""The Open Inference Protocol over gRPC (`GRPCInferenceService`, the servicer tritonclient ships).

Ray Serve's gRPC ingress calls the server replica's method of each RPC's name with the request
message; these methods are a mixin of `service.app.Server`, so gRPC requests go through the
same models, batches and decoders as HTTP. Enabled by `grpc_options` in the serve config (see
docs/serving-api.md). Tensors travel as `raw_input_contents` /
`raw_output_contents`, as tritonclient sends and reads them.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from . import protocol_models
from .data_plane import DataPlane
from .errors import InvalidParameter, ServiceError
from .protocol import (
    EXTENSIONS,
    SERVER_VERSION,
    RequestInput,
    model_input,
    output_names,
    raw_tensor,
    tensor_images,
    tensor_shape,
)
from .repository_api import config_json, load_model, repository_index, unload_model
from .route_table import GRPC

# tritonclient generated the protocol's messages as module `grpc_service_pb2`, a name nothing
# can import; pickle finds a class by its module's name. Ray's Python gRPC proxy (the one that
# serves where HAProxy does not) pickles each message to a replica, so the name must resolve
# in both processes: the proxy imports this module through SERVICER, a replica through Server.
sys.modules.setdefault(pb.ModelInferRequest.__module__, pb)

SERVICER = "service.grpc_api.add_servicer"  # the serve config's `grpc_servicer_functions`


def add_servicer(servicer: Any, server: grpc.Server) -> None:
    """tritonclient's `add_GRPCInferenceServiceServicer_to_server`, from this module so that
    the proxy that calls it can also pickle the messages."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GrpcInference:
    """The RPCs of `inference.GRPCInferenceService` on a server replica: each admitted and
    counted by the data plane (`self.plane`) as its HTTP route is, under the route table's
    gRPC entries (`route_table.GRPC`)."""

    plane: DataPlane

    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context) -> Any:
        return await self._rpc("ServerLive", grpc_context, pb.ServerLiveResponse(), _live)

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context) -> Any:
        async def ready(call: _Call) -> Any:
            return pb.ServerReadyResponse(ready=not self.plane.pending())

        return await self._rpc("ServerReady", grpc_context, pb.ServerReadyResponse(), ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context) -> Any:
        async def ready(call: _Call) -> Any:
            try:
                _, ready = protocol_models.readiness(self.plane, request.name, request.version)
            except ServiceError:  # no such model or version (or still training): not ready
                ready = False
            return pb.ModelReadyResponse(ready=ready)

        return await self._rpc("ModelReady", grpc_context, pb.ModelReadyResponse(), ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context) -> Any:
        async def metadata(call: _Call) -> Any:
            return pb.ServerMetadataResponse(
                name="convnext-serve", version=SERVER_VERSION, extensions=EXTENSIONS
            )

        empty = pb.ServerMetadataResponse()
        return await self._rpc("ServerMetadata", grpc_context, empty, metadata)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context) -> Any:
        async def metadata(call: _Call) -> Any:
            found = protocol_models.metadata(self.plane, request.name, request.version)
            del found["parameters"]  # not a field of the gRPC message
            return json_format.ParseDict(found, pb.ModelMetadataResponse())

        empty = pb.ModelMetadataResponse()
        return await self._rpc("ModelMetadata", grpc_context, empty, metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context) -> Any:
        async def infer(call: _Call) -> Any:
            plane = self.plane
            client = call.headers.get("x-client-id")
            model = protocol_models.target(plane, request.model_name, request.model_version, client)
            # a full queue's refusal is counted under the version, as HTTP's
            call.model, call.version = model.name, model.version
            model.admit()
            inputs = [
                RequestInput(name=t.name, shape=list(t.shape), datatype=t.datatype)
                for t in request.inputs
            ]
            tensor = model_input(inputs, model.name)
            if len(request.raw_input_contents) != 1:
                raise InvalidParameter("send the input's data as raw_input_contents")
            images = tensor_images(tensor, request.raw_input_contents[0], plane.config)
            tensors = await model.infer(images, _parameters(request.parameters))
            names = output_names(model.name, [o.name for o in request.outputs], tensors)
            datatypes = model.datatypes()
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=model.version, id=request.id
            )
            for name in names:
                response.outputs.add(
                    name=name, datatype=datatypes[name], shape=tensor_shape(tensors[name])
                )
                response.raw_output_contents.append(raw_tensor(tensors[name], datatypes[name]))
            return response

        return await self._rpc("ModelInfer", grpc_context, pb.ModelInferResponse(), infer)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, grpc_context) -> Any:
        async def index(call: _Call) -> Any:
            models = [
                entry
                for entry in repository_index(self.plane)
                if not request.ready or entry["state"] == "READY"
            ]
            return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

        empty = pb.RepositoryIndexResponse()
        return await self._rpc("RepositoryIndex", grpc_context, empty, index)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, grpc_context
    ) -> Any:
        async def load(call: _Call) -> Any:
            config = request.parameters.get("config")
            given = config_json(config.string_param) if config is not None else None
            await load_model(self.plane, request.model_name, given)
            return pb.RepositoryModelLoadResponse()

        empty = pb.RepositoryModelLoadResponse()
        return await self._rpc("RepositoryModelLoad", grpc_context, empty, load)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, grpc_context
    ) -> Any:
        async def unload(call: _Call) -> Any:
            await unload_model(self.plane, request.model_name)
            return pb.RepositoryModelUnloadResponse()

        empty = pb.RepositoryModelUnloadResponse()
        return await self._rpc("RepositoryModelUnload", grpc_context, empty, unload)

    async def _rpc(
        self, method: str, grpc_context, empty: Any, handle: Callable[[_Call], Awaitable[Any]]
    ) -> Any:
        """One RPC through the data plane's admission and metrics, as an HTTP request goes
        through the guard: a refusal is the gRPC status of its HTTP status, with its message."""
        plane, route = self.plane, GRPC[method]
        call = _Call(headers=dict(grpc_context.invocation_metadata() or ()))
        started = plane.enter(route)
        try:
            plane.admit(route, call.headers)
            response = await handle(call)
        except ServiceError as e:
            call.status = e.status
            return _refuse(grpc_context, e, empty)
        except BaseException:
            call.status = 500
            raise
        finally:
            plane.leave(route, call.model, call.version, call.status, started)
        return response


@dataclass
class _Call:
    """An RPC's metadata, and what the request metrics record of it: the model and version
    it resolved, its status."""

    headers: dict[str, str]
    model: str = ""
    version: str = ""
    status: int = 200


async def _live(call: _Call) -> Any:
    return pb.ServerLiveResponse(live=True)


def _refuse(grpc_context, error: ServiceError, empty: Any) -> Any:
    grpc_context.set_code(STATUS.get(error.status, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(error.message)
    return empty


def _parameters(parameters: Any) -> dict[str, Any]:
    """A request's `map<string, InferParameter>` as plain values."""
    values = {}
    for name, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[name] = getattr(parameter, kind) if kind else None
    return values
