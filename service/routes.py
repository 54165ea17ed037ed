"""The HTTP API (docs/serving-api.md): thin route handlers over the server replica.

Each handler parses its query parameters (FastAPI), asks the server (`request.app.state.server`,
see `service.app.Server`) to run the request's images through the model, and shapes the answer
with the task's adapter. Errors are raised as `service.errors` types and answered in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from models.images import decode_image

from . import render as draw
from .errors import install_error_handlers, response_for
from .guard import GuardMiddleware
from .schemas import (
    ClassifyResponse,
    DetectResponse,
    ErrorResponse,
    Health,
    ModelsResponse,
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

ERRORS: dict[int | str, dict[str, Any]] = {
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

api = FastAPI(
    title="convnext-serve",
    description="ConvNeXt classification, detection (Mask R-CNN) and segmentation (UperNet). "
    "Send images as multipart `image` fields (one or more) or as a raw `image/*` body.",
    version="1",
)
MODEL = Query(None, description="model name (default: the first of the task)")

# The server replica of this process. Not `api.state`: Serve runs a copy of the app object
# (made when the deployment is defined), while this module and its functions are the same.
_server_of_this_process: Any = None


def attach(server: Any) -> None:
    global _server_of_this_process
    _server_of_this_process = server


def current_server() -> Any:
    return _server_of_this_process


def _server(_: Request) -> Any:
    return _server_of_this_process


install_error_handlers(api)
api.include_router(v2_router)  # the Open Inference Protocol (`service/v2.py`)


PAGE = (Path(__file__).resolve().parent / "page" / "index.html").read_text()


@api.get("/", include_in_schema=False, response_class=HTMLResponse)
async def page() -> HTMLResponse:
    """The page for people: pick or drop images, see the answers drawn (`service/page`)."""
    return HTMLResponse(PAGE)


@api.get("/healthz", summary="Liveness: 200 while the process serves", response_model=Health)
async def healthz() -> dict:
    return {"status": "ok"}


@api.get(
    "/readyz",
    summary="Readiness: 200 when every model is loaded and warmed up",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "models still warming up"}},
)
async def readyz(request: Request) -> JSONResponse:
    server = _server(request)
    training = server.training_status()
    extra = {"training": training} if training else {}  # not served yet: not waited for
    pending = server.pending_models()
    if pending:
        return JSONResponse(
            {"status": "starting", "waiting_for": pending, **extra}, status_code=503
        )
    return JSONResponse({"status": "ready", "models": sorted(server.hosts), **extra})


@api.get(
    "/v1/models",
    summary="Every served model with its metadata and serving settings",
    response_model=ModelsResponse,
)
async def models(request: Request) -> dict:
    server = _server(request)
    return {
        "models": [host.describe() for host in server.hosts.values()],
        "training": server.training_status(),
    }


@api.post(
    "/v1/classify",
    summary="Top-k classes of each image",
    openapi_extra=IMAGE_BODY,
    response_model=ClassifyResponse,
    responses=ERRORS,
)
async def classify(
    request: Request,
    model: str | None = MODEL,
    top_k: int = Query(5, ge=1, le=TOP_K_MAX, description="classes per image"),
) -> JSONResponse:
    return JSONResponse(await classify_answer(request, model, top_k))


async def classify_answer(request: Request, model: str | None, top_k: int) -> dict:
    server = _server(request)
    host = server.model_for(request, "classify", model)
    images = await server.images(request)
    outputs = await server.run(host, images, ClassifyOptions(top_k))
    return {"model": host.name, "results": [host.task.result(host.meta, out) for out in outputs]}


def fast_lane(scope: dict) -> Callable[[dict, Any, Any], Awaitable[None]] | None:
    """The handler of the hot path, `POST /v1/classify` with a query the route takes as it is
    (`model`, `top_k` from 1 to TOP_K_MAX): the route's own code, called from the guard past
    FastAPI's routing, parameter injection and exception middleware (two fifths of the event
    loop's time a request). Any other request (None) takes the full route, which also words
    the errors of its parameters."""
    if scope["path"] != "/v1/classify" or scope["method"] != "POST":
        return None
    model, top_k = None, 5
    for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
        if key == "model":
            model = value
        elif key == "top_k" and value.isascii() and value.isdigit():
            top_k = int(value)
        else:
            return None
    if not 1 <= top_k <= TOP_K_MAX:
        return None

    async def handle(scope: dict, receive: Any, send: Any) -> None:
        try:
            response = JSONResponse(await classify_answer(Request(scope, receive), model, top_k))
        except Exception as e:  # as the full route's handlers answer them
            response = response_for(e, scope["path"])
        await response(scope, receive, send)

    return handle


api.add_middleware(GuardMiddleware, server=current_server, lane=fast_lane)


@api.post(
    "/v1/detect",
    summary="Boxes, classes, scores and instance masks (COCO RLE)",
    openapi_extra=IMAGE_BODY,
    response_model=DetectResponse,
    responses={**ERRORS, **PNG},
)
async def detect(
    request: Request,
    model: str | None = MODEL,
    score_threshold: float = Query(0.5, ge=0, le=1),
    max_detections: int = Query(100, ge=1, le=1000),
    masks: bool = Query(True, description="include instance masks"),
    render: bool = Query(False, description="answer an image/png with the result drawn"),
) -> Response:
    server = _server(request)
    host = server.model_for(request, "detect", model)
    images = await server.images(request, single=render)
    options = DetectOptions(score_threshold, max_detections, masks or render)
    outputs = await server.run(host, images, options)
    results = [host.task.result(host.meta, out) for out in outputs]
    if render:
        png = await asyncio.to_thread(_render_detections, images[0], results[0], host.meta)
        return Response(png, media_type="image/png")
    return JSONResponse({"model": host.name, "results": results})


@api.post(
    "/v1/segment",
    summary="A class id for every pixel",
    openapi_extra=IMAGE_BODY,
    response_model=SegmentResponse,
    responses={**ERRORS, **PNG},
)
async def segment(
    request: Request,
    model: str | None = MODEL,
    format: str = Query("json", pattern="^(json|png)$", description="json or png"),
    render: bool = Query(False, description="answer an image/png with the map drawn"),
) -> Response:
    server = _server(request)
    host = server.model_for(request, "segment", model)
    images = await server.images(request, single=render or format == "png")
    maps = await server.run(host, images, SegmentOptions())
    if render:
        png = await asyncio.to_thread(_render_segmentation, images[0], maps[0], host.meta)
        return Response(png, media_type="image/png")
    if format == "png":
        return Response(draw.class_map_png(maps[0]), media_type="image/png")
    results = await asyncio.to_thread(lambda: [host.task.result(host.meta, m) for m in maps])
    return JSONResponse({"model": host.name, "results": results})


def _render_detections(data: bytes, result: dict, meta) -> bytes:
    pixels = decode_image(data).pixels  # every pixel, for people to look at
    return draw.render_detections(pixels, result["detections"], meta.labels, (1.0, 1.0))


def _render_segmentation(data: bytes, class_map, meta) -> bytes:
    return draw.render_segmentation(decode_image(data).pixels, class_map, meta.num_classes)
