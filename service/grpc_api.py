"""The Open Inference Protocol over gRPC (`GRPCInferenceService`, the servicer tritonclient ships).

Ray Serve's gRPC ingress calls the server replica's method of each RPC's name with the request
message; these methods are a mixin of `service.app.Server`, so gRPC requests go through the
same models, batches and decoders as HTTP. Enabled by `grpc_options` in the serve config (see
docs/serving-api.md). Tensors travel as `raw_input_contents` /
`raw_output_contents`, as tritonclient sends and reads them.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from .errors import InvalidParameter, ServiceError, Unauthorized
from .guard import authorised
from .protocol import (
    EXTENSIONS,
    VERSION,
    RequestInput,
    images_of,
    model_metadata,
    raw_tensor,
    tensor_shape,
    the_input,
)

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
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GrpcInference:
    """The RPCs of `inference.GRPCInferenceService` on a server replica."""

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.pending_models())

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context) -> Any:
        host = self.hosts.get(request.name)
        return pb.ModelReadyResponse(ready=host is not None and host.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> Any:
        return pb.ServerMetadataResponse(
            name="convnext-serve", version=VERSION, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context) -> Any:
        try:
            self._check_grpc_key(grpc_context)
            host = self.model_named(request.name, request.version)
        except ServiceError as e:
            return _refuse(grpc_context, e, pb.ModelMetadataResponse())
        metadata = model_metadata(host.name, host.task, host.meta)
        del metadata["parameters"]  # not a field of the gRPC message
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context) -> Any:
        try:
            self._check_grpc_key(grpc_context)
            host = self.model_named(request.model_name, request.model_version)
            if host.full():
                raise host.overloaded()
            inputs = [
                RequestInput(name=t.name, shape=list(t.shape), datatype=t.datatype)
                for t in request.inputs
            ]
            tensor = the_input(inputs, host.name)
            if len(request.raw_input_contents) != 1:
                raise InvalidParameter("send the input's data as raw_input_contents")
            images = images_of(tensor, request.raw_input_contents[0], self.config)
            options = host.task.options_from(_parameters(request.parameters))
            outputs = await self.run(host, images, options)
            tensors = host.task.tensors(host.meta, outputs, options)
            names = [o.name for o in request.outputs] or list(tensors)
            unknown = [n for n in names if n not in tensors]
            if unknown:
                raise InvalidParameter(f"model {host.name!r} has no output {unknown[0]!r} here")
        except ServiceError as e:
            return _refuse(grpc_context, e, pb.ModelInferResponse())
        datatypes = {n: d for n, d, _ in host.task.tensor_outputs(host.meta)}
        response = pb.ModelInferResponse(model_name=host.name, model_version=VERSION, id=request.id)
        for name in names:
            response.outputs.add(
                name=name, datatype=datatypes[name], shape=tensor_shape(tensors[name])
            )
            response.raw_output_contents.append(raw_tensor(tensors[name], datatypes[name]))
        return response

    def _check_grpc_key(self, grpc_context) -> None:
        if not self.api_keys:
            return
        if not authorised(dict(grpc_context.invocation_metadata() or ()), self.api_keys):
            raise Unauthorized()


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
