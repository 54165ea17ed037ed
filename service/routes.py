"""The HTTP API (docs/serving-api.md): thin route handlers over the replica's data plane.

Each handler parses its query parameters (FastAPI), asks the data plane
(`service.data_plane`, the app's `state.plane`) for the model and to run the request's images
through it, and shapes the answer with the task's adapter. Errors are raised as
`service.errors` types and answered in one place. `make_api` builds the app of one replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from models.images import decode_image

from . import render as draw
from .body import read_images
from .data_plane import DataPlane
from .errors import install_error_handlers, response_for
from .guard import GuardMiddleware
from .host import ModelHost
from .pipelines import run_pipeline
from .repository_api import router as repository_router
from .schemas import (
    ClassifyResponse,
    DetectResponse,
    ErrorResponse,
    Health,
    ModelsResponse,
    PipelineResponse,
    Readiness,
    SegmentResponse,
)
from .tasks import TOP_K_MAX, ClassifyOptions, DetectOptions, SegmentOptions
from .v2 import router as v2_router

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (JPEG, PNG, WebP, BMP, GIF, TIFF)",
                        }
                    },
                    "required": ["image"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

V1_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "invalid_image, invalid_multipart"),
        (401, "unauthorized"),
        (404, "model_not_found"),
        (413, "payload_too_large, image_too_large"),
        (415, "unsupported_media_type"),
        (422, "invalid_parameter"),
        (503, "overloaded, model_training, model_unavailable (with Retry-After)"),
        (408, "request_timeout"),
        (504, "timeout"),
    ]
}
PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "JSON, or a PNG with render / format=png"}
}

DESCRIPTION = (
    "ConvNeXt classification, detection (Mask R-CNN) and segmentation (UperNet). "
    "Send images as multipart `image` fields (one or more) or as a raw `image/*` body."
)
MODEL = Query(None, description="model name (default: the first of the task)")
MODEL_VERSION = Query(None, description="model version (default: drawn by the versions' weights)")

router = APIRouter()


def make_api(plane: DataPlane) -> FastAPI:
    """The HTTP app of one server replica: `/v1`, the page, health, the Open Inference
    Protocol's REST routes, the guard in front and the errors answered in one place."""
    api = FastAPI(title="convnext-serve", description=DESCRIPTION, version="1")
    api.state.plane = plane
    install_error_handlers(api)
    api.include_router(router)
    api.include_router(v2_router)  # the Open Inference Protocol (`service/v2.py`)
    api.include_router(repository_router)  # its model repository (`service/repository_api.py`)
    api.add_middleware(GuardMiddleware, plane=plane, lane=fast_lane)
    return api


def plane_of(request: Request) -> DataPlane:
    return request.app.state.plane


PLANE = Depends(plane_of)


def model_for(
    request: Request, plane: DataPlane, task: str, name: str | None, version: str | None
) -> ModelHost:
    """The task's model version the request names (or the weights draw, sticky per the
    `X-Client-Id` header), noted for the request metrics and the answer's headers."""
    host = plane.model(task, name, version, request.headers.get("x-client-id"))
    request.state.model, request.state.version = host.name, host.version
    return host


def answer(host: ModelHost, results: list) -> dict:
    """A `/v1` JSON answer: the model and version that made it, and one result per image."""
    return {"model": host.name, "version": host.version, "results": results}


PAGE = (Path(__file__).resolve().parent / "page" / "index.html").read_text()


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def page() -> HTMLResponse:
    """The page for people: pick or drop images, see the answers drawn (`service/page`)."""
    return HTMLResponse(PAGE)


@router.get("/healthz", summary="Liveness: 200 while the process serves", response_model=Health)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 when every model is loaded and warmed up",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "models still warming up"}},
)
async def readyz(plane: DataPlane = PLANE) -> JSONResponse:
    ready, body = plane.readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/v1/models",
    summary="Every served model with its metadata and serving settings",
    response_model=ModelsResponse,
)
async def models(plane: DataPlane = PLANE) -> dict:
    return plane.listing()


@router.post(
    "/v1/classify",
    summary="Top-k classes of each image",
    openapi_extra=IMAGE_BODY,
    response_model=ClassifyResponse,
    responses=V1_ERRORS,
)
async def classify(
    request: Request,
    model: str | None = MODEL,
    version: str | None = MODEL_VERSION,
    top_k: int = Query(5, ge=1, le=TOP_K_MAX, description="classes per image"),
) -> JSONResponse:
    return JSONResponse(await classify_answer(request, model, version, top_k))


async def classify_answer(
    request: Request, model: str | None, version: str | None, top_k: int
) -> dict:
    plane = plane_of(request)
    host = model_for(request, plane, "classify", model, version)
    images = await read_images(request, plane.config)
    outputs = await plane.infer(host, images, ClassifyOptions(top_k))
    return answer(host, [host.task.result(host.meta, out) for out in outputs])


def fast_lane(scope: dict) -> Callable[[dict, Any, Any], Awaitable[None]] | None:
    """The handler of the route the table marks `fast`, `POST /v1/classify`, when its query is
    one the route takes as it is (`model`, `version`, `top_k` from 1 to TOP_K_MAX): the route's
    own code, called from the guard past FastAPI's routing, parameter injection and exception
    middleware (most of the event loop's own time a request). Any other request (None) takes
    the full route, which also words the errors of its parameters."""
    if scope["path"] != "/v1/classify" or scope["method"] != "POST":
        return None
    model, version, top_k = None, None, 5
    for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
        if key == "model":
            model = value
        elif key == "version":
            version = value
        elif key == "top_k" and value.isascii() and value.isdigit():
            top_k = int(value)
        else:
            return None
    if not 1 <= top_k <= TOP_K_MAX:
        return None

    async def handle(scope: dict, receive: Any, send: Any) -> None:
        try:
            request = Request(scope, receive)
            response = JSONResponse(await classify_answer(request, model, version, top_k))
        except Exception as e:  # as the full route's handlers answer them
            response = response_for(e, scope["path"])
        await response(scope, receive, send)

    return handle


@router.post(
    "/v1/detect",
    summary="Boxes, classes, scores and instance masks (COCO RLE)",
    openapi_extra=IMAGE_BODY,
    response_model=DetectResponse,
    responses={**V1_ERRORS, **PNG},
)
async def detect(
    request: Request,
    model: str | None = MODEL,
    version: str | None = MODEL_VERSION,
    score_threshold: float = Query(0.5, ge=0, le=1),
    max_detections: int = Query(100, ge=1, le=1000),
    masks: bool = Query(True, description="include instance masks"),
    render: bool = Query(False, description="answer an image/png with the result drawn"),
    plane: DataPlane = PLANE,
) -> Response:
    host = model_for(request, plane, "detect", model, version)
    images = await read_images(request, plane.config, single=render)
    options = DetectOptions(score_threshold, max_detections, masks or render)
    outputs = await plane.infer(host, images, options)
    results = [host.task.result(host.meta, out) for out in outputs]
    if render:
        png = await asyncio.to_thread(_render_detections, images[0], results[0], host.meta)
        return Response(png, media_type="image/png")
    return JSONResponse(answer(host, results))


@router.post(
    "/v1/segment",
    summary="A class id for every pixel",
    openapi_extra=IMAGE_BODY,
    response_model=SegmentResponse,
    responses={**V1_ERRORS, **PNG},
)
async def segment(
    request: Request,
    model: str | None = MODEL,
    version: str | None = MODEL_VERSION,
    format: str = Query("json", pattern="^(json|png)$", description="json or png"),
    render: bool = Query(False, description="answer an image/png with the map drawn"),
    plane: DataPlane = PLANE,
) -> Response:
    host = model_for(request, plane, "segment", model, version)
    images = await read_images(request, plane.config, single=render or format == "png")
    maps = await plane.infer(host, images, SegmentOptions())
    if render:
        png = await asyncio.to_thread(_render_segmentation, images[0], maps[0], host.meta)
        return Response(png, media_type="image/png")
    if format == "png":
        return Response(draw.class_map_png(maps[0]), media_type="image/png")
    results = await asyncio.to_thread(lambda: [host.task.result(host.meta, m) for m in maps])
    return JSONResponse(answer(host, results))


@router.post(
    "/v1/pipelines/{name}",
    summary="Detect, then classify or segment each object found, in one request",
    openapi_extra=IMAGE_BODY,
    response_model=PipelineResponse,
    responses=V1_ERRORS,
)
async def pipeline(request: Request, name: str, plane: DataPlane = PLANE) -> JSONResponse:
    config = plane.pipeline(name)
    request.state.model, request.state.version = name, ""
    images = await read_images(request, plane.config)
    return JSONResponse(
        await run_pipeline(plane, config, images, request.headers.get("x-client-id"))
    )


def _render_detections(data: bytes, result: dict, meta) -> bytes:
    pixels = decode_image(data).pixels  # every pixel, for people to look at
    return draw.render_detections(pixels, result["detections"], meta.labels, (1.0, 1.0))


def _render_segmentation(data: bytes, class_map, meta) -> bytes:
    return draw.render_segmentation(decode_image(data).pixels, class_map, meta.num_classes)
