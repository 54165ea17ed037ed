"""Every failure a client can be told about, one exception type each, and the one place that
turns them (and FastAPI's own) into responses: `{"error": {"code", "message"}}`, or on the Open
Inference Protocol's routes (`/v2`) the protocol's `{"error": "<message>"}`
(docs/serving-api.md)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.images import ImageError

from .route_table import route_of

log = logging.getLogger("ray.serve")


class ServiceError(Exception):
    """An error answered with `status` and `code`; `headers` go with the response."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.headers = message, headers


class InvalidImage(ServiceError):
    status, code = 400, "invalid_image"


class InvalidMultipart(ServiceError):
    status, code = 400, "invalid_multipart"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(
        self,
        message: str = "a valid API key is required (Authorization: Bearer <key> or X-API-Key)",
    ):
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    """A repository call that is off, or names a checkpoint it may not load."""

    status, code = 403, "forbidden"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    status, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class RetryLater(ServiceError):
    """A 503 the client should send again: `Retry-After` says when."""

    status = 503

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class Overloaded(RetryLater):
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(f"{message}; retry shortly", retry_after_s)


class ModelTraining(RetryLater):
    """The model is still training (a demo model `convnext-serve run` trains in the
    background): retry after about the time its training expects to need."""

    code = "model_training"


class ModelUnavailable(RetryLater):
    """The model loaded but failed to warm up: Serve's health check restarts its replica."""

    code = "model_unavailable"


class Timeout(ServiceError):
    status, code = 504, "timeout"


IMAGE_ERRORS: dict[str, type[ServiceError]] = {
    "invalid_image": InvalidImage,
    "image_too_large": ImageTooLarge,
}


def image_error(error: ImageError, index: int, count: int) -> ServiceError:
    """The response to an image the decoder refused; with several images, it names which."""
    prefix = f"image {index}: " if count > 1 else ""
    return IMAGE_ERRORS[error.code](prefix + str(error))


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, *, path: str
) -> JSONResponse:
    """The error as the route's API words it (`path`: the request's)."""
    error = message if route_of(path).protocol == "v2" else {"code": code, "message": message}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def response_for(e: Exception, path: str) -> JSONResponse:
    """The response to an exception a handler raised: ours as they say, anything else a 500."""
    if isinstance(e, ServiceError):
        return error_response(e.status, e.code, e.message, e.headers, path=path)
    log.exception("internal error", exc_info=e)
    return error_response(
        500, "internal_error", f"{type(e).__name__}: the server failed", path=path
    )


def install_error_handlers(app: FastAPI) -> None:
    """Our errors, FastAPI's parameter validation and routing errors, and anything else."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError) -> JSONResponse:
        return response_for(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}: {err['msg']}"
            for err in e.errors()
        )
        return error_response(422, InvalidParameter.code, problems, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        headers = getattr(e, "headers", None)
        return error_response(e.status_code, code, str(e.detail), headers, path=request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return response_for(e, request.url.path)
