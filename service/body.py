"""A request's images: the `image` fields of a multipart form, or one raw `image/*` body.

The raw body is the cheap path (no multipart parser); both are read with the body limit
enforced while reading, and the form's parts are bounded in number and size.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from .config import ServerConfig
from .errors import (
    InvalidMultipart,
    InvalidParameter,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)


def body_limit_text(config: ServerConfig) -> str:
    return f"the request body is over the limit of {config.max_body_bytes} bytes"


async def read_images(request: Request, config: ServerConfig, single: bool = False) -> list[bytes]:
    """The request's image bytes; `single`: exactly one image is allowed (render, png)."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" and not ctype.startswith(b"image/"):
        raise UnsupportedMediaType(
            f"send multipart/form-data with 'image' fields or an image/* body, not "
            f"{ctype.decode('latin-1') or 'no content type'}"
        )
    body = await read_body(request, config)
    if ctype.startswith(b"image/"):
        images = [body]
    else:
        images = await _form_images(body, params.get(b"boundary"), config)
    if not images:
        raise InvalidParameter("the form has no 'image' field")
    if len(images) > config.max_images_per_request:
        raise InvalidParameter(
            f"{len(images)} images; at most {config.max_images_per_request} a request"
        )
    if single and len(images) > 1:
        raise InvalidParameter("render and format=png take one image")
    return images


async def read_body(request: Request, config: ServerConfig) -> bytes:
    """The body, refused (413) as soon as it is over the limit, and (408) when it has not
    arrived within `body_timeout_s`: a client sending slowly holds one coroutine, for a while."""
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise PayloadTooLarge(body_limit_text(config))
            chunks.append(chunk)

    try:
        async with asyncio.timeout(config.body_timeout_s):
            await read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {config.body_timeout_s:g} s"
        ) from None
    return b"".join(chunks)


async def _form_images(body: bytes, boundary: bytes | None, config: ServerConfig) -> list[bytes]:
    """The `image` fields' bytes, files or plain fields (curl's `-F image=<file`). Beside
    them a form may hold a few other files and at most 64 other fields."""
    if not boundary:
        raise InvalidMultipart("the multipart content type names no boundary")
    # The parser takes a body cut off mid-part as a form without that part; say what it is.
    if not body.rstrip().endswith(b"--" + boundary + b"--"):
        raise InvalidMultipart("the multipart body ends before its closing boundary (cut off?)")

    async def stream():
        yield body

    # latin-1 maps each byte to one character, so an image sent as a plain field (which the
    # parser hands over as text) comes back byte for byte.
    content_type = f'multipart/form-data; boundary="{boundary.decode("latin-1")}"; charset=latin-1'
    parser = MultiPartParser(
        Headers({"content-type": content_type}),
        stream(),
        max_files=config.max_images_per_request + 8,
        max_fields=64,
        max_part_size=config.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidMultipart(f"malformed multipart body: {e}") from None
    images = []
    for value in form.getlist("image"):
        images.append(await value.read() if hasattr(value, "read") else value.encode("latin-1"))
    await form.close()
    return images
