"""The Open Inference Protocol's REST routes (`/v2`, docs/serving-api.md): thin handlers over
the same server replica, batches and decoding as `/v1`.

Each served model is a protocol model of the same name, with its versions, and two inputs of
which a request sends one: `image` (`BYTES [N]`, encoded images, decoded as `/v1` decodes them) or
`pixels` (`UINT8 [N, H, W, 3]`, RGB, preprocessed as a decoded image). The `/v1` query
parameters travel as request `parameters`; the outputs are the task's tensors
(`service.tasks`), JSON or binary as the client asks.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .body import read_body
from .config import ServerConfig
from .data_plane import DataPlane
from .protocol import (
    EXTENSIONS,
    INFER_EXAMPLE,
    SERVER_VERSION,
    InferenceRequest,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    Ready,
    ServerMetadata,
    model_input,
    parse_request,
    response_body,
    tensor_images,
)
from .protocol_models import metadata, readiness, target

V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolError, "description": text}
    for status, text in [
        (400, "not ready (readiness routes)"),
        (401, "no valid API key"),
        (404, "no such model or version"),
        (413, "body or image over the limits"),
        (422, "a request, tensor or parameter the model cannot take"),
        (503, "overloaded (with Retry-After)"),
        (504, "timeout"),
    ]
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"example": INFER_EXAMPLE},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the binary tensor extension: the JSON request, "
                "Inference-Header-Content-Length bytes, then the tensors' bytes",
            },
        },
    }
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], responses=V2_ERRORS)


def _plane(request: Request) -> DataPlane:
    return request.app.state.plane


def _not_ready(body: dict) -> JSONResponse:
    # the protocol: 200 means ready, a 4xx means not
    return JSONResponse(body, status_code=400)


@router.get("/health/live", summary="Liveness", response_model=Live)
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every model warmed up", response_model=Ready)
async def ready(request: Request) -> JSONResponse:
    is_ready = not _plane(request).pending()
    return JSONResponse({"ready": True}) if is_ready else _not_ready({"ready": False})


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata() -> dict:
    return {"name": "convnext-serve", "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/models/{name}", summary="Model metadata", response_model=ModelMetadata)
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def get_model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    return metadata(_plane(request), name, version)


@router.get("/models/{name}/ready", summary="Model readiness", response_model=ModelReady)
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    """Ready: the version named, or every version of the model (of a pipeline's models), warm."""
    name, ready = readiness(_plane(request), name, version)
    body = {"name": name, "ready": ready}
    return JSONResponse(body) if ready else _not_ready(body)


@router.post(
    "/models/{name}/infer",
    summary="Inference: encoded images (BYTES) or RGB pixels (UINT8) in, the task's tensors out",
    response_model=InferenceResponse,
    openapi_extra=INFER_BODY,
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    plane = _plane(request)
    model = target(plane, name, version, request.headers.get("x-client-id"))
    request.state.model, request.state.version = model.name, model.version
    model.admit()
    body = await read_body(request, plane.config)
    header_length = request.headers.get("inference-header-content-length")
    # a large JSON body takes a while to parse: off the event loop, where other requests wait
    parse = functools.partial(_request_images, body, header_length, model.name, plane.config)
    infer_request, images = parse() if len(body) < LARGE_BODY else await asyncio.to_thread(parse)
    tensors = await model.infer(images, infer_request.parameters or {})
    content, header_length = response_body(
        model.name, model.version, infer_request, tensors, model.datatypes()
    )
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


LARGE_BODY = 1 << 20


def _request_images(
    body: bytes, header_length: str | None, model: str, config: ServerConfig
) -> tuple[InferenceRequest, list]:
    """The request and its images, every inconsistency the client's error."""
    infer_request, binary = parse_request(body, header_length)
    tensor = model_input(infer_request.inputs, model)
    return infer_request, tensor_images(tensor, binary.get(tensor.name), config)
