"""The one place that turns failures into responses (`service.errors`), in-process: every
typed error's status, code and headers, in `/v1`'s words and the protocol's, and the 500 that
anything else becomes (no client input reaches it, so only here can a test see its body)."""

from __future__ import annotations

import json
import logging

import pytest

from models.images import ImageError
from service import errors
from service.errors import (
    ImageTooLarge,
    InvalidImage,
    ModelTraining,
    ModelUnavailable,
    Overloaded,
    ServiceError,
    Unauthorized,
    error_response,
    image_error,
    response_for,
)

# every error a client can be told about: (status, code)
EXPECTED = {
    "InvalidImage": (400, "invalid_image"),
    "InvalidMultipart": (400, "invalid_multipart"),
    "Unauthorized": (401, "unauthorized"),
    "Forbidden": (403, "forbidden"),
    "ModelNotFound": (404, "model_not_found"),
    "RequestTimeout": (408, "request_timeout"),
    "PayloadTooLarge": (413, "payload_too_large"),
    "ImageTooLarge": (413, "image_too_large"),
    "UnsupportedMediaType": (415, "unsupported_media_type"),
    "InvalidParameter": (422, "invalid_parameter"),
    "Overloaded": (503, "overloaded"),
    "ModelTraining": (503, "model_training"),
    "ModelUnavailable": (503, "model_unavailable"),
    "Timeout": (504, "timeout"),
}


def body(response) -> dict:
    return json.loads(response.body)


def test_every_error_has_its_documented_status_and_code():
    found = {
        name: (cls.status, cls.code)
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, ServiceError) and cls.code != "internal_error"
    }
    assert found == EXPECTED


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/models", "/"])
def test_v1_errors_are_code_and_message(path):
    r = response_for(InvalidImage("not an image"), path)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert body(r) == {"error": {"code": "invalid_image", "message": "not an image"}}


@pytest.mark.parametrize("path", ["/v2", "/v2/models/m/infer", "/v2/health/ready"])
def test_protocol_errors_are_the_message_alone(path):
    r = response_for(InvalidImage("not an image"), path)
    assert r.status_code == 400 and body(r) == {"error": "not an image"}


def test_a_v2_lookalike_path_is_not_the_protocols():
    assert body(response_for(InvalidImage("x"), "/v2x/models"))["error"]["code"] == "invalid_image"


# Each error is made inside the test: made at collection, it would escape a mutation run.
@pytest.mark.parametrize(
    "make, headers",
    [
        (lambda: Overloaded("model 'm' has a full queue", 3), {"retry-after": "3"}),
        (lambda: ModelTraining("model 'm' is training", 42), {"retry-after": "42"}),
        (lambda: ModelUnavailable("model 'm' failed to warm up", 5), {"retry-after": "5"}),
        (lambda: Unauthorized(), {"www-authenticate": "Bearer"}),
    ],
)
def test_errors_carry_their_headers(make, headers):
    error = make()
    r = response_for(error, "/v1/classify")
    assert r.status_code == error.status
    assert {k: r.headers[k] for k in headers} == headers


def test_unauthorized_says_how_to_send_a_key():
    message = body(response_for(Unauthorized(), "/v1/classify"))["error"]["message"]
    assert message == "a valid API key is required (Authorization: Bearer <key> or X-API-Key)"


def test_overloaded_says_to_retry():
    message = body(response_for(Overloaded("model 'm' has a full queue", 3), "/v1/x"))
    assert message["error"]["message"] == "model 'm' has a full queue; retry shortly"


def test_anything_else_is_a_500_that_names_only_its_type_and_is_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        r = response_for(KeyError("secret internal detail"), "/v1/detect")
    assert r.status_code == 500
    assert body(r) == {
        "error": {"code": "internal_error", "message": "KeyError: the server failed"}
    }
    assert "secret" not in r.body.decode()  # the detail goes to the log, not the client
    assert any(
        rec.getMessage() == "internal error" and "secret internal detail" in str(rec.exc_info[1])
        for rec in caplog.records
    )
    protocol = response_for(ValueError("x"), "/v2/models/m/infer")
    assert protocol.status_code == 500
    assert body(protocol) == {"error": "ValueError: the server failed"}


def test_error_response_without_headers():
    r = error_response(404, "not_found", "no route", path="/v1/nothing")
    assert r.status_code == 404 and "retry-after" not in r.headers
    assert body(r) == {"error": {"code": "not_found", "message": "no route"}}


@pytest.mark.parametrize(
    "code, expected", [("invalid_image", InvalidImage), ("image_too_large", ImageTooLarge)]
)
def test_an_image_the_decoder_refused_names_its_index_among_several(code, expected):
    one = image_error(ImageError(code, "cannot decode"), index=0, count=1)
    assert type(one) is expected and one.message == "cannot decode"
    third = image_error(ImageError(code, "cannot decode"), index=2, count=3)
    assert type(third) is expected and third.message == "image 2: cannot decode"
    second = image_error(ImageError(code, "cannot decode"), index=1, count=2)
    assert second.message == "image 1: cannot decode"
