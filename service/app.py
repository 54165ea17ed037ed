"""The Ray Serve application: one batching deployment per model behind a FastAPI gateway.

`build_app(args)` is the application builder a Ray Serve config names
(`import_path: service.app:build_app`). The gateway validates, decodes and resizes images
(cheap work that scales with CPU replicas) and sends a request's images to the model
deployment in one call; there each image is its own batch item, so images of one request
batch with other requests'. The model replicas batch with `@serve.batch`, normalise on the
device and run the model.
"""

import asyncio
import base64
import contextlib
import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.checkpoint import CheckpointMeta, read_checkpoint_meta
from models.classification import resize_crop

from . import render as draw
from .admission import ModelBusy, ModelQueue, gateway_share
from .config import AppConfig, GatewayConfig, ModelConfig
from .imaging import DecodedImage, ImageError, decode
from .metrics import ModelMetrics, gateway_metrics
from .runtime import ClassifyItem, DetectItem, ModelRunner, SegmentItem, resolve_checkpoint

log = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- model replicas


@serve.deployment
class ModelServer:
    """A model replica: loads and warms up the model, then runs dynamic batches."""

    def __init__(self, config: dict):
        self.config = ModelConfig.model_validate(config)
        self.runner = ModelRunner(self.config)
        self.runner.warmup()
        self.infer.set_max_batch_size(self.config.max_batch_size)
        self.infer.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.metrics = ModelMetrics(self.config.name)
        self.model_free = asyncio.Event()
        self.model_free.set()
        meta = self.runner.meta
        self.info_tags = {
            "model": self.config.name,
            "arch": meta.arch,
            "task": meta.task,
            "device": self.runner.device.type,
            "precision": self.runner.precision,
        }

    async def __call__(self, items: list[Any]) -> list[Any]:
        """Results for the images of one call (a request's images, up to a batch of them).

        One call carries several images so a multi-image request pays Ray's per-call cost
        once; each image still enters the batch queue on its own and batches with other
        calls' images.
        """
        arrived = time.perf_counter()
        # Ray Serve forms the next batch as soon as an item arrives, even while the model is
        # busy with the previous one, so under load every batch would hold a single item.
        # Holding arrivals here while a batch runs lets them enter the queue together when the
        # model frees up, and `@serve.batch` then takes them as one batch.
        await self.model_free.wait()
        if len(items) == 1:  # the usual case, without gather's task per item
            return [await self.infer((arrived, items[0]))]
        return await asyncio.gather(*(self.infer((arrived, item)) for item in items))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def infer(self, entries: list[tuple[float, Any]]) -> list[Any]:
        started = time.perf_counter()
        for queued_at, _ in entries:
            self.metrics.queue_wait.observe(started - queued_at)
        # On the runner's thread, so the event loop keeps taking requests (held at the gate).
        self.model_free.clear()
        try:
            items = [item for _, item in entries]
            results = await asyncio.wrap_future(self.runner.submit(items))
        finally:
            self.model_free.set()
        self.metrics.inference.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(entries))
        self.metrics.images.inc(len(entries))
        self.metrics.info.set(1, tags=self.info_tags)
        return results

    def describe(self) -> dict[str, Any]:
        # /readyz asks for this: the info gauge exists from readiness on, before any request.
        self.metrics.info.set(1, tags=self.info_tags)
        return self.runner.describe()


# --------------------------------------------------------------------------------- gateway


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


IMAGE_STATUS = {"invalid_image": 400, "image_too_large": 413}

ERROR_EXAMPLE = {"error": {"code": "invalid_image", "message": "image 0: not a decodable image"}}
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


def _responses(example: dict, png: bool = False) -> dict:
    ok: dict = {"content": {"application/json": {"example": example}}}
    if png:
        ok["content"]["image/png"] = {}
    errors = {
        status: {"description": text, "content": {"application/json": {"example": ERROR_EXAMPLE}}}
        for status, text in [
            (400, "invalid_image"),
            (401, "unauthorized"),
            (404, "model_not_found"),
            (413, "payload_too_large / image_too_large"),
            (415, "unsupported_media_type"),
            (422, "invalid_parameter"),
            (503, "overloaded (with Retry-After)"),
            (504, "timeout"),
        ]
    }
    return {200: ok, **errors}


CLASSIFY_EXAMPLE = {
    "model": "shapes-classifier",
    "results": [{"predictions": [{"label": "circle", "class_id": 0, "score": 0.97}]}],
}
DETECT_EXAMPLE = {
    "model": "shapes-detector",
    "results": [
        {
            "width": 640,
            "height": 480,
            "detections": [
                {
                    "label": "circle", "class_id": 0, "score": 0.97,
                    "box": [12.5, 40.0, 210.0, 230.5],
                    "mask": {"size": [480, 640], "counts": "<COCO RLE>"},
                }
            ],
        }
    ],
}  # fmt: skip
SEGMENT_EXAMPLE = {
    "model": "shapes-segmenter",
    "results": [
        {
            "width": 640,
            "height": 480,
            "classes": [{"class_id": 2, "label": "square", "pixel_fraction": 0.21}],
            "mask": {"format": "png", "data": "<base64 PNG, one class id per pixel>"},
        }
    ],
}

app = FastAPI(
    title="convnext-serve",
    description="ConvNeXt classification, detection (Mask R-CNN) and segmentation (UperNet). "
    "Send images as multipart `image` fields (one or more) or as a raw `image/*` body.",
    version="1",
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.code, e.message, e.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_parameter(_: Request, e: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}: {err['msg']}"
        for err in e.errors()
    )
    return error_response(422, "invalid_parameter", problems)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return error_response(e.status_code, code, str(e.detail), getattr(e, "headers", None))


@app.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return error_response(500, "internal_error", f"{type(e).__name__}: the server failed")


def _needed_short_side(endpoint: str, meta: CheckpointMeta) -> int:
    if endpoint == "classify":
        return math.ceil(meta.image_size / meta.crop_pct)
    return meta.image_size


def _fit(pixels: np.ndarray, short: int, long: int) -> np.ndarray:
    """(3, h, w) uint8 no larger than the model will look at (short side `short`, long side
    at most `long`); smaller images pass unchanged, the model scales them itself."""
    from torchvision.transforms.v2 import functional as TF

    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    h, w = chw.shape[-2:]
    scale = min(short / min(h, w), long / max(h, w))
    if scale < 1:
        chw = TF.resize(chw, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return chw.contiguous().numpy()


def _cancel(calls: list) -> None:
    """Cancel the calls still running; a call that already failed may raise again here."""
    for call in calls:
        with contextlib.suppress(Exception):  # it is finished either way
            call.cancel()


def _segment_result(class_map: np.ndarray, meta: CheckpointMeta) -> dict:
    counts = np.bincount(class_map.ravel(), minlength=meta.num_classes)
    total = max(1, class_map.size)
    classes = [
        {"class_id": int(c), "label": meta.labels[c], "pixel_fraction": round(counts[c] / total, 6)}
        for c in np.flatnonzero(counts)
    ]
    png = base64.b64encode(draw.class_map_png(class_map)).decode()
    return {
        "width": int(class_map.shape[1]),
        "height": int(class_map.shape[0]),
        "classes": classes,
        "mask": {"format": "png", "data": png},
    }


class GuardMiddleware:
    """Runs `Gateway.guard` around every HTTP request, as plain ASGI.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs each request through a
    task group and memory streams, a cost every request pays on the gateway's CPU.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        gateway = getattr(scope["app"].state, "gateway", None) if "app" in scope else None
        if scope["type"] != "http" or gateway is None:  # or outside a gateway replica
            await self.app(scope, receive, send)
            return
        await gateway.guard(self.app, scope, receive, send)


app.add_middleware(GuardMiddleware)


def _endpoint_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "root"


@serve.deployment
@serve.ingress(app)
class Gateway:
    """HTTP front: auth, limits, decoding and resizing, fan-out to the model deployments."""

    def __init__(self, gateway: dict, models: list[dict], handles: dict[str, DeploymentHandle]):
        self.config = GatewayConfig.model_validate(gateway)
        self.model_configs = {m["name"]: ModelConfig.model_validate(m) for m in models}
        self.handles = handles
        self.queues = {
            name: ModelQueue(
                gateway_share(cfg.ongoing, cfg.max_replicas, self.config.num_replicas),
                cfg.max_queued_requests,
            )
            for name, cfg in self.model_configs.items()
        }
        self.metas: dict[str, CheckpointMeta] = {
            name: read_checkpoint_meta(resolve_checkpoint(cfg.checkpoint))
            for name, cfg in self.model_configs.items()
        }
        keys = os.environ.get(self.config.api_keys_env, "")
        self.api_keys = {k.strip() for k in keys.split(",") if k.strip()}
        self.metrics = gateway_metrics()
        self.in_flight: dict[str, int] = {}
        self.ready = False
        self.descriptions: dict[str, dict] = {}
        torch.set_num_threads(1)  # resizing here must not compete with the model's threads
        app.state.gateway = self  # for the middleware (auth, limits, metrics)

    async def guard(self, app, scope, receive, send) -> None:
        """Auth, the in-flight limit, the body-size limit, and the request metrics."""
        request = Request(scope)
        path = request.url.path
        endpoint = _endpoint_of(path)
        started = time.perf_counter()
        # the endpoint sets request.state.model to the model it resolves; scope["state"] is
        # where request.state lives, so the value is shared with the endpoint's Request
        request.state.model = request.query_params.get("model", "")
        status = 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        count = sum(self.in_flight.values())
        self.in_flight[endpoint] = self.in_flight.get(endpoint, 0) + 1
        self.metrics.in_flight.set(self.in_flight[endpoint], tags={"endpoint": endpoint})
        try:
            refusal = None
            if path.startswith("/v1/") and self.api_keys and not self._authorised(request):
                refusal = error_response(
                    401, "unauthorized", "a valid API key is required (Authorization: Bearer "
                    "<key> or X-API-Key)", {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            elif path.startswith("/v1/") and count >= self.config.max_in_flight:
                refusal = self._overloaded("the gateway is at its in-flight request limit")
            elif int(request.headers.get("content-length") or 0) > self.config.max_body_bytes:
                refusal = error_response(413, "payload_too_large", self._body_limit_text())
            if refusal is not None:
                await refusal(scope, receive, send_and_note_status)
            else:
                await app(scope, receive, send_and_note_status)
        finally:
            self.in_flight[endpoint] -= 1
            self.metrics.in_flight.set(self.in_flight[endpoint], tags={"endpoint": endpoint})
            if path.startswith("/v1/"):
                tags = {"endpoint": endpoint, "model": request.state.model}
                self.metrics.requests.inc(tags={**tags, "status": str(status)})
                self.metrics.duration.observe(time.perf_counter() - started, tags=tags)

    def _authorised(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        return (key or request.headers.get("x-api-key", "")) in self.api_keys

    def _overloaded(self, why: str) -> JSONResponse:
        return error_response(
            503, "overloaded", f"{why}; retry shortly",
            {"Retry-After": str(self.config.retry_after_s)},
        )  # fmt: skip

    def _body_limit_text(self) -> str:
        return f"the request body is over the limit of {self.config.max_body_bytes} bytes"

    # -------------------------------------------------------------------- plain endpoints

    @app.get("/healthz", summary="Liveness: 200 while the process serves")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 when every model is loaded and warmed up")
    async def readyz(self) -> JSONResponse:
        if not self.ready:
            pending = await self._pending_models()
            if pending:
                return JSONResponse({"status": "starting", "waiting_for": pending}, status_code=503)
            self.ready = True
        return JSONResponse({"status": "ready", "models": sorted(self.handles)})

    async def _pending_models(self) -> list[str]:
        """Models with no replica that has finished loading and warming up yet."""

        async def answered(name: str) -> bool:
            try:
                self.descriptions[name] = await asyncio.wait_for(
                    self.handles[name].describe.remote(), timeout=0.5
                )
                return True
            except Exception:
                return False

        names = sorted(self.handles)
        done = await asyncio.gather(*(answered(n) for n in names))
        return [n for n, ok in zip(names, done, strict=True) if not ok]

    @app.get("/v1/models", summary="Every served model with its metadata and serving settings")
    async def models(self) -> dict:
        await self._pending_models()
        out = []
        for name, cfg in self.model_configs.items():
            desc = self.descriptions.get(name) or {
                "name": name,
                "task": self.metas[name].task,
                "device": None,
                "precision": cfg.precision,
                "metadata": self.metas[name].model_dump(mode="json"),
                "serving": {"max_batch_size": cfg.max_batch_size},
            }
            out.append({**desc, "ready": name in self.descriptions})
        return {"models": out}

    # --------------------------------------------------------------------- task endpoints

    @app.post(
        "/v1/classify",
        summary="Top-k classes of each image",
        openapi_extra=IMAGE_BODY,
        responses=_responses(CLASSIFY_EXAMPLE),
    )
    async def classify(
        self,
        request: Request,
        model: str | None = Query(None, description="model name (default: the first)"),
        top_k: int = Query(5, ge=1, le=1000, description="classes per image"),
    ) -> JSONResponse:
        name, meta = self._model(request, "classify", model)
        images = await self._images(request)
        _, items = await self._decode_all(
            "classify", images, meta, lambda d: ClassifyItem(self._classify_view(d, meta), top_k)
        )
        outputs = await self._infer(name, items)
        results = [
            {
                "predictions": [
                    {"label": meta.labels[c], "class_id": c, "score": round(s, 6)} for c, s in out
                ]
            }
            for out in outputs
        ]
        return JSONResponse({"model": name, "results": results})

    @app.post(
        "/v1/detect",
        summary="Boxes, classes, scores and instance masks (COCO RLE)",
        openapi_extra=IMAGE_BODY,
        responses=_responses(DETECT_EXAMPLE, png=True),
    )
    async def detect(
        self,
        request: Request,
        model: str | None = Query(None, description="model name (default: the first)"),
        score_threshold: float = Query(0.5, ge=0, le=1),
        max_detections: int = Query(100, ge=1, le=1000),
        masks: bool = Query(True, description="include instance masks"),
        render: bool = Query(False, description="answer an image/png with the result drawn"),
    ) -> Response:
        name, meta = self._model(request, "detect", model)
        images = await self._images(request, single=render)

        def item(d: DecodedImage) -> DetectItem:
            limit = meta.model_kwargs.get("max_size", 1333)
            pixels = _fit(d.pixels, meta.image_size, limit)
            return DetectItem(
                pixels, (d.height, d.width), score_threshold, max_detections, masks or render
            )

        decoded, items = await self._decode_all("detect", images, meta, item, draft=not render)
        outputs = await self._infer(name, items)
        results = []
        for det in outputs:
            detections = []
            for i in range(len(det.scores)):
                entry = {
                    "label": meta.labels[int(det.class_ids[i])],
                    "class_id": int(det.class_ids[i]),
                    "score": round(float(det.scores[i]), 6),
                    "box": [round(float(v), 2) for v in det.boxes[i]],
                }
                if det.masks is not None:  # asked for, or needed to render
                    entry["mask"] = det.masks[i]
                detections.append(entry)
            results.append({"width": det.width, "height": det.height, "detections": detections})
        if render:
            d = decoded[0]
            scale = (d.pixels.shape[1] / d.width, d.pixels.shape[0] / d.height)
            png = await asyncio.to_thread(
                draw.render_detections, d.pixels, results[0]["detections"], meta.labels, scale
            )
            return Response(png, media_type="image/png")
        return JSONResponse({"model": name, "results": results})

    @app.post(
        "/v1/segment",
        summary="A class id for every pixel",
        openapi_extra=IMAGE_BODY,
        responses=_responses(SEGMENT_EXAMPLE, png=True),
    )
    async def segment(
        self,
        request: Request,
        model: str | None = Query(None, description="model name (default: the first)"),
        format: str = Query("json", pattern="^(json|png)$", description="json or png"),
        render: bool = Query(False, description="answer an image/png with the map drawn"),
    ) -> Response:
        name, meta = self._model(request, "segment", model)
        images = await self._images(request, single=render or format == "png")

        def item(d: DecodedImage) -> SegmentItem:
            return SegmentItem(_fit(d.pixels, meta.image_size, 4 * meta.image_size),
                               (d.height, d.width))  # fmt: skip

        decoded, items = await self._decode_all("segment", images, meta, item, draft=not render)
        maps = await self._infer(name, items)
        if render:
            png = await asyncio.to_thread(
                draw.render_segmentation, decoded[0].pixels, maps[0], meta.num_classes
            )
            return Response(png, media_type="image/png")
        if format == "png":
            return Response(draw.class_map_png(maps[0]), media_type="image/png")
        results = await asyncio.to_thread(lambda: [_segment_result(m, meta) for m in maps])
        return JSONResponse({"model": name, "results": results})

    # ------------------------------------------------------------------------------ steps

    def _model(self, request: Request, task: str, name: str | None) -> tuple[str, CheckpointMeta]:
        if name is None:
            name = next((n for n, m in self.metas.items() if m.task == task), None)
            if name is None:
                raise ApiError(404, "model_not_found", f"no {task} model is served")
        elif name not in self.metas or self.metas[name].task != task:
            served = [n for n, m in self.metas.items() if m.task == task]
            raise ApiError(404, "model_not_found", f"no {task} model {name!r}; served: {served}")
        request.state.model = name
        if self.queues[name].full():  # refuse before reading and decoding the images
            raise self._model_busy(name)
        return name, self.metas[name]

    async def _images(self, request: Request, single: bool = False) -> list[bytes]:
        """The request's image bytes: multipart `image` fields, or a raw image/* body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data" and not ctype.startswith("image/"):
            raise ApiError(
                415, "unsupported_media_type",
                f"send multipart/form-data with 'image' fields or an image/* body, not "
                f"{ctype or 'no content type'}",
            )  # fmt: skip
        body = await self._read_body(request)
        if ctype.startswith("image/"):
            images = [body]
        else:
            images = await self._multipart_images(request, body)
        if not images:
            raise ApiError(422, "invalid_parameter", "the form has no 'image' field")
        if len(images) > self.config.max_images_per_request:
            raise ApiError(
                422, "invalid_parameter",
                f"{len(images)} images; at most {self.config.max_images_per_request} a request",
            )  # fmt: skip
        if single and len(images) > 1:
            raise ApiError(422, "invalid_parameter", "render and format=png take one image")
        return images

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise ApiError(413, "payload_too_large", self._body_limit_text())
            chunks.append(chunk)
        return b"".join(chunks)

    async def _multipart_images(self, request: Request, body: bytes) -> list[bytes]:
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        parser = MultiPartParser(
            request.headers, stream(), max_files=self.config.max_images_per_request + 8,
            max_fields=64, max_part_size=self.config.max_body_bytes,
        )  # fmt: skip
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, "invalid_multipart", f"malformed multipart body: {e}") from None
        images = []
        for value in form.getlist("image"):
            images.append(await value.read() if hasattr(value, "read") else value.encode())
        await form.close()
        return images

    async def _decode_all(self, endpoint, images, meta, make_item, draft=True):
        """Decode and preprocess every image in worker threads; errors name the image.

        With `draft`, JPEGs decode at the smallest DCT scale that still gives the model all
        the pixels it will look at; rendering wants the full image instead.
        """
        limit = self.config.max_pixels
        need = _needed_short_side(endpoint, meta) if draft else None

        def work(data: bytes) -> tuple[DecodedImage, Any]:
            started = time.perf_counter()
            decoded = decode(data, limit, need)
            item = make_item(decoded)
            self.metrics.decode.observe(time.perf_counter() - started, tags={"endpoint": endpoint})
            return decoded, item

        outcomes = await asyncio.gather(
            *(asyncio.to_thread(work, data) for data in images), return_exceptions=True
        )
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, ImageError):
                prefix = f"image {i}: " if len(images) > 1 else ""
                raise ApiError(IMAGE_STATUS[outcome.code], outcome.code, prefix + str(outcome))
            if isinstance(outcome, BaseException):
                raise outcome
        return [d for d, _ in outcomes], [it for _, it in outcomes]

    def _classify_view(self, decoded: DecodedImage, meta: CheckpointMeta) -> np.ndarray:
        view = resize_crop(
            torch.from_numpy(decoded.pixels).permute(2, 0, 1),
            meta.image_size, meta.crop_pct, meta.interpolation,
        )  # fmt: skip
        return view.contiguous().numpy()

    async def _infer(self, name: str, items: list) -> list:
        """The request's images in calls of at most a batch each: one call per request in the
        usual case, while a big request still spreads over the model's replicas. Each call
        waits for a slot in this gateway's share of the model (`admission.ModelQueue`)."""
        handle, queue = self.handles[name], self.queues[name]
        config = self.model_configs[name]
        timeout = config.timeout_s or self.config.request_timeout_s
        calls = []

        async def call(chunk: list) -> list:
            async with queue.slot():
                calls.append(handle.remote(chunk))
                return await calls[-1]

        size = config.max_batch_size
        tasks = [
            asyncio.ensure_future(call(items[i : i + size])) for i in range(0, len(items), size)
        ]
        try:
            answers = await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout)
        except BaseException as e:
            for task in tasks:  # the request's other calls are no use now
                task.cancel()
            _cancel(calls)
            if isinstance(e, (ModelBusy, BackPressureError)):
                raise self._model_busy(name) from None
            if isinstance(e, asyncio.TimeoutError):
                raise ApiError(504, "timeout", f"no answer within {timeout:g} s") from None
            raise
        return [result for answer in answers for result in answer]

    def _model_busy(self, name: str) -> ApiError:
        return ApiError(
            503, "overloaded", f"model {name!r} has a full queue; retry shortly",
            {"Retry-After": str(self.config.retry_after_s)},
        )  # fmt: skip


# ----------------------------------------------------------------------------- the builder


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application from a serve config's args (models and gateway settings)."""
    config = AppConfig.from_args(args)
    share = _default_gpu_share(config)
    handles = {}
    for m in config.models:
        num_gpus = m.num_gpus if m.num_gpus is not None else (share if m.device != "cpu" else 0)
        options: dict[str, Any] = {
            "name": f"model-{m.name}",
            "max_ongoing_requests": m.ongoing,
            "max_queued_requests": m.max_queued_requests,
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": num_gpus},
        }
        if m.autoscaling_config:
            options["autoscaling_config"] = m.autoscaling_config
        else:
            options["num_replicas"] = m.num_replicas
        handles[m.name] = ModelServer.options(**options).bind(m.model_dump())
    gateway = config.gateway
    return Gateway.options(
        name="gateway",
        num_replicas=gateway.num_replicas,
        max_ongoing_requests=gateway.max_in_flight + 64,
        ray_actor_options={"num_cpus": gateway.num_cpus},
    ).bind(gateway.model_dump(), [m.model_dump() for m in config.models], handles)


def _default_gpu_share(config: AppConfig) -> float:
    """GPUs per model replica when the config names none: the models share one GPU.

    Decided from the cluster's resources, not this process's devices: on KubeRay the app is
    built on a head node without GPUs while the replicas run on GPU workers.
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if not gpus and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
    forced = any(m.device == "cuda" for m in config.models)
    if not gpus and not forced:
        return 0.0
    on_gpu = sum(1 for m in config.models if m.device != "cpu" and m.num_gpus is None)
    return round(1.0 / max(1, on_gpu), 3)
