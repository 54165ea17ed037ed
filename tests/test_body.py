"""A request's images (`service.body`), in-process: Starlette's own `Request` over an ASGI
receive channel that delivers the body in chunks, as a server would, or too slowly."""

from __future__ import annotations

import asyncio
import re

import pytest
from starlette.requests import Request

from service.body import read_images
from service.config import ServerConfig
from service.errors import (
    InvalidMultipart,
    InvalidParameter,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

CONFIG = ServerConfig(max_body_bytes=1024, max_images_per_request=3, body_timeout_s=0.3)


def request(body: bytes, content_type: str | None, chunk: int = 64, pause_s: float = 0.0):
    """A request whose body arrives `chunk` bytes at a time, `pause_s` apart; `received`
    counts the chunks the server took."""
    headers = [(b"content-type", content_type.encode())] if content_type else []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/classify",
        "headers": headers,
        "query_string": b"",
    }
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    received = []

    async def receive() -> dict:
        if pause_s:
            await asyncio.sleep(pause_s)
        part = parts[len(received)]
        received.append(part)
        return {"type": "http.request", "body": part, "more_body": len(received) < len(parts)}

    r = Request(scope, receive)
    r.received = received
    return r


def form(*fields: tuple, boundary: str = "XyZ", end: bool = True) -> bytes:
    """A multipart body of (name, data) file parts, or (name, data, False): plain fields, as
    curl's `-F name=<file` sends them."""
    out = b""
    for name, data, *is_file in fields:
        if is_file == [False]:
            head = f'Content-Disposition: form-data; name="{name}"\r\n'
        else:
            head = (
                f'Content-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
                "Content-Type: application/octet-stream\r\n"
            )
        out += f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if end else b"")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


MULTIPART = "multipart/form-data; boundary=XyZ"


def read(req: Request, single: bool = False) -> list[bytes]:
    return asyncio.run(read_images(req, CONFIG, single))


def test_a_raw_image_body_is_one_image():
    assert read(request(b"\x89PNG" + b"p" * 300, "image/png")) == [b"\x89PNG" + b"p" * 300]
    assert read(request(b"jpeg", "IMAGE/JPEG; charset=binary")) == [b"jpeg"]


def test_the_forms_image_fields_in_order_and_nothing_else():
    body = form(("image", b"one"), ("note", b"not an image"), ("image", b"two"))
    assert read(request(body, MULTIPART)) == [b"one", b"two"]


@pytest.mark.parametrize("ctype", [None, "application/json", "text/plain", "multipart/mixed"])
def test_other_content_types_are_415(ctype):
    said = f"send multipart/form-data with 'image' fields or an image/* body, not {ctype}"
    with pytest.raises(
        UnsupportedMediaType, match=exactly(said.replace("None", "no content type"))
    ):
        read(request(b"x", ctype))


def test_a_body_at_the_limit_is_read_and_one_over_it_is_refused_while_streaming():
    assert read(request(b"x" * 1024, "image/png")) == [b"x" * 1024]
    big = request(b"x" * 5000, "image/png", chunk=100)
    with pytest.raises(PayloadTooLarge, match="over the limit of 1024 bytes"):
        read(big)
    assert len(big.received) == 11  # stopped at the chunk that crossed the limit


def test_a_body_that_does_not_arrive_in_time_is_408():
    slow = request(b"x" * 640, "image/png", chunk=64, pause_s=0.1)  # ten chunks, 1 s
    with pytest.raises(RequestTimeout, match="within 0.3 s"):
        read(slow)
    assert len(slow.received) < 10


def test_image_counts():
    with pytest.raises(InvalidParameter, match=exactly("the form has no 'image' field")):
        read(request(form(("photo", b"x")), MULTIPART))
    three = form(*[("image", b"x")] * 3)
    assert read(request(three, MULTIPART)) == [b"x"] * 3  # the limit itself is allowed
    with pytest.raises(InvalidParameter, match="4 images; at most 3"):
        read(request(form(*[("image", b"x")] * 4), MULTIPART))
    assert read(request(form(("image", b"x")), MULTIPART), single=True) == [b"x"]
    two = form(("image", b"a"), ("image", b"b"))
    with pytest.raises(InvalidParameter, match=exactly("render and format=png take one image")):
        read(request(two, MULTIPART), single=True)
    assert asyncio.run(read_images(request(two, MULTIPART), CONFIG)) == [b"a", b"b"]


def test_broken_forms_are_invalid_multipart():
    no_boundary = exactly("the multipart content type names no boundary")
    with pytest.raises(InvalidMultipart, match=no_boundary):
        read(request(form(("image", b"x")), "multipart/form-data"))
    cut = exactly("the multipart body ends before its closing boundary (cut off?)")
    with pytest.raises(InvalidMultipart, match=cut):
        read(request(form(("image", b"x"), end=False), MULTIPART))
    with pytest.raises(InvalidMultipart, match="before its closing boundary"):
        read(request(form(("image", b"x"), boundary="Other"), MULTIPART))
    garbled = b"--XyZ\r\nno headers here\r\n\r\nx\r\n--XyZ--\r\n"
    with pytest.raises(InvalidMultipart, match="malformed multipart body"):
        read(request(garbled, MULTIPART))


def test_an_image_may_be_a_plain_field_of_any_size_the_body_allows():
    """curl's `-F image=<photo.jpg` sends no filename: a plain field, which Starlette's parser
    would cap at 1 MB; the body limit is the one that holds."""
    big = bytes(range(256)) * 6000  # 1.5 MB
    config = ServerConfig(max_body_bytes=2_000_000, max_images_per_request=3)
    body = form(("image", big, False), ("image", b"small", False))
    got = asyncio.run(read_images(request(body, MULTIPART, chunk=65536), config))
    assert got == [big, b"small"]


def test_a_form_holds_a_few_other_files_and_at_most_64_other_fields():
    """Beside the images, up to 8 other files and 64 plain fields; more is refused by the
    parser before it reads them all."""
    config = ServerConfig(max_body_bytes=1_000_000, max_images_per_request=3)

    def parts(images: int, files: int, fields: int) -> list[bytes]:
        body = form(
            *[("image", b"i")] * images,
            *[("other", b"f")] * files,
            *[("note", b"n", False)] * fields,
        )
        return asyncio.run(read_images(request(body, MULTIPART, chunk=65536), config))

    assert parts(images=3, files=8, fields=64) == [b"i"] * 3
    with pytest.raises(InvalidMultipart, match="Too many files"):
        parts(images=3, files=9, fields=0)
    with pytest.raises(InvalidMultipart, match="Too many fields"):
        parts(images=1, files=0, fields=65)
