"""Faults and bad input against the real service: `convnext-serve run`, real HTTP (through
HAProxy), real signals and processes.

Every case of the bad-input table gets its documented status and code, never a 5xx, a hang or
a dropped connection, and the service is healthy afterwards; then overload, a replica killed
under load, and SIGTERM with requests in flight.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import re
import signal
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from .live_service import API_KEY, AUTH, closed_loop, run_service, server_replicas
from .service_models import service_checkpoints
from .test_imaging import corrupt_png, png_header
from .test_service import photo

pytestmark = pytest.mark.needs_models("service")

MAX_IMAGES = 4
BODY_TIMEOUT_S = 3
CAPACITY = 16  # colours: max_ongoing_requests + max_queued_requests, per replica
# A server replica's in-flight limit: HAProxy refuses beyond it (`service.haproxy_front`)
MAX_IN_FLIGHT = CAPACITY


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ckpt = service_checkpoints()
    models = [
        {
            "name": "colours",
            "checkpoint": str(ckpt["classify"]),
            "max_batch_size": 8,
            "max_ongoing_requests": 8,
            "max_queued_requests": 8,
        },
        {"name": "boxes", "checkpoint": str(ckpt["detect"]), "max_batch_size": 4},
        {"name": "regions", "checkpoint": str(ckpt["segment"]), "max_batch_size": 4},
    ]
    gateway = {
        "max_body_bytes": 2_000_000,
        "max_images_per_request": MAX_IMAGES,
        "body_timeout_s": BODY_TIMEOUT_S,
        "max_in_flight": MAX_IN_FLIGHT,
        "num_replicas": 2,
    }
    yield from run_service(tmp_path_factory.mktemp("faults"), models, gateway)


# ------------------------------------------------------------------------ raw HTTP


def raw_request(
    url: str, head: bytes, body_parts=(), pause_s: float = 0.0, timeout: float = 60
) -> tuple[int, dict, bytes]:
    """Send bytes as they are (a lying Content-Length, a slow body) and read the answer:
    (status, headers, body); status 0 when the connection dropped without an answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                time.sleep(pause_s)
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before the body was all sent
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return 0, {}, b""
        return response.status, dict(response.headers), response.read()


def head_of(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"X-API-Key: {API_KEY}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------------ images


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_rows(width: int, height: int) -> bytes:
    """A solid red PNG of any size, written row by row without holding its pixels (a 1 x
    40,000,000 strip is 156 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = b"\x00" + b"\xc8\x1e\x1e" * width
    pixels = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to claim `width` x `height`."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def ztxt_bomb() -> bytes:
    """A valid 8x8 PNG with a text chunk that inflates to 20 MB."""
    png = encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")
    text = b"Comment\x00\x00" + zlib.compress(b"\x00" * 20_000_000, 9)
    chunk = struct.pack(">I", len(text) - 0) + b"zTXt" + text
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + text))
    at = png.find(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def many_frames_gif(frames: int = 300) -> bytes:
    images = [Image.new("P", (64, 64), i % 256) for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)


def apng(frames: int = 100) -> bytes:
    images = [Image.new("RGB", (64, 64), (i, 30, 30)) for i in range(frames)]
    return encode(images[0], "PNG", save_all=True, append_images=images[1:])


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in parts
    )
    return body + f"--{boundary}--\r\n".encode()


def red() -> bytes:
    return photo("red")[0]


# ------------------------------------------------------------------------ the table


@dataclass
class Case:
    """One bad (or strange but valid) request: what it sends and what it must get."""

    name: str
    status: int
    code: str | None  # the error code (None: a success)
    method: str = "POST"
    path: str = "/v1/classify"
    images: Callable[[], list[bytes]] | None = None  # multipart `image` fields
    body: Callable[[], bytes] | None = None  # a body as it is
    headers: dict[str, str] = field(default_factory=dict)
    params: dict | str | None = None
    auth: bool = True


C = Case
CASES = [
    # images the decoder must refuse, before decoding where the header says enough
    C("not an image", 400, "invalid_image", images=lambda: [b"this is not an image"]),
    C("empty image", 400, "invalid_image", images=lambda: [b""]),
    C(
        "truncated jpeg",
        400,
        "invalid_image",
        path="/v1/detect",
        images=lambda: [red()[: len(red()) // 2]],
    ),
    C("corrupt png zlib", 400, "invalid_image", images=lambda: [corrupt_png()]),
    C("html as an image", 400, "invalid_image", images=lambda: [b"<html><body>hi</body></html>"]),
    C("svg", 400, "invalid_image", images=lambda: [b'<svg xmlns="http://www.w3.org/2000/svg"/>']),
    C(
        "ico format",
        400,
        "invalid_image",
        images=lambda: [encode(Image.new("RGB", (16, 16)), "ICO")],
    ),
    C(
        "png header 100000 x 100000",
        413,
        "image_too_large",
        images=lambda: [png_header(100_000, 100_000)],
    ),
    C(
        "jpeg header 65000 x 65000",
        413,
        "image_too_large",
        path="/v1/segment",
        images=lambda: [jpeg_claiming(65_000, 65_000)],
    ),
    C("1 x 40000001 strip", 413, "image_too_large", images=lambda: [png_header(1, 40_000_001)]),
    C("ztxt decompression bomb", 400, "invalid_image", images=lambda: [ztxt_bomb()]),
    # strange but valid: bounded work, an answer
    C("1 x 40000 strip", 200, None, images=lambda: [png_rows(1, 40_000)]),
    C("40000 x 1 strip", 200, None, images=lambda: [png_rows(40_000, 1)]),
    C("detect 1 x 40000", 200, None, path="/v1/detect", images=lambda: [png_rows(1, 40_000)]),
    C("detect 40000 x 1", 200, None, path="/v1/detect", images=lambda: [png_rows(40_000, 1)]),
    C("segment 1 x 40000", 200, None, path="/v1/segment", images=lambda: [png_rows(1, 40_000)]),
    C("segment 40000 x 1", 200, None, path="/v1/segment", images=lambda: [png_rows(40_000, 1)]),
    C("1 x 40000000 strip at the limit", 200, None, images=lambda: [png_rows(1, 40_000_000)]),
    C("1 x 1 image", 200, None, path="/v1/detect", images=lambda: [png_rows(1, 1)]),
    C("gif of 300 frames", 200, None, images=lambda: [many_frames_gif()]),
    C("apng of 100 frames", 200, None, path="/v1/segment", images=lambda: [apng()]),
    # bodies
    C(
        "multipart cut mid-part",
        400,
        "invalid_multipart",
        body=lambda: multipart([("image", red())])[:-400],
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    ),
    C(
        "multipart without a boundary",
        400,
        "invalid_multipart",
        body=lambda: multipart([("image", red())]),
        headers={"Content-Type": "multipart/form-data"},
    ),
    C(
        "multipart of garbage",
        400,
        "invalid_multipart",
        body=lambda: b"\x00garbage" * 100,
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    ),
    C(
        "multipart without an image field",
        422,
        "invalid_parameter",
        body=lambda: multipart([("picture", red())]),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    ),
    C("too many images", 422, "invalid_parameter", images=lambda: [red()] * (MAX_IMAGES + 1)),
    C(
        "ten thousand form fields",
        400,
        "invalid_multipart",
        body=lambda: multipart([(f"f{i}", b"x") for i in range(10_000)]),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    ),
    C(
        "body over the limit",
        413,
        "payload_too_large",
        body=lambda: b"\xff" * 2_500_000,
        headers={"Content-Type": "image/jpeg"},
    ),
    C(
        "text body",
        415,
        "unsupported_media_type",
        body=lambda: b"hello",
        headers={"Content-Type": "text/plain"},
    ),
    C("no content type", 415, "unsupported_media_type", body=lambda: red(), headers={}),
    C(
        "json as image/png",
        400,
        "invalid_image",
        body=lambda: b'{"image": 1}',
        headers={"Content-Type": "image/png"},
    ),
    C(
        "empty raw body",
        400,
        "invalid_image",
        body=lambda: b"",
        headers={"Content-Type": "image/jpeg"},
    ),
    # query parameters
    C("top_k 0", 422, "invalid_parameter", images=lambda: [red()], params={"top_k": 0}),
    C("top_k 10**9", 422, "invalid_parameter", images=lambda: [red()], params={"top_k": 10**9}),
    C("top_k text", 422, "invalid_parameter", images=lambda: [red()], params={"top_k": "many"}),
    C("top_k repeated", 200, None, images=lambda: [red()], params="top_k=1&top_k=3&top_k=2"),
    C(
        "threshold nan",
        422,
        "invalid_parameter",
        path="/v1/detect",
        images=lambda: [red()],
        params={"score_threshold": "nan"},
    ),
    C(
        "threshold inf",
        422,
        "invalid_parameter",
        path="/v1/detect",
        images=lambda: [red()],
        params={"score_threshold": "inf"},
    ),
    C(
        "max_detections -1",
        422,
        "invalid_parameter",
        path="/v1/detect",
        images=lambda: [red()],
        params={"max_detections": -1},
    ),
    C(
        "masks perhaps",
        422,
        "invalid_parameter",
        path="/v1/detect",
        images=lambda: [red()],
        params={"masks": "perhaps"},
    ),
    C(
        "format gif",
        422,
        "invalid_parameter",
        path="/v1/segment",
        images=lambda: [red()],
        params={"format": "gif"},
    ),
    C("unknown parameter", 200, None, images=lambda: [red()], params={"colour": "please"}),
    C("model nope", 404, "model_not_found", images=lambda: [red()], params={"model": "nope"}),
    C(
        "model path",
        404,
        "model_not_found",
        images=lambda: [red()],
        params={"model": "../../etc/passwd"},
    ),
    C(
        "model 10 KB",
        404,
        "model_not_found",
        images=lambda: [red()],
        params={"model": "m" * 10_000},
    ),
    C("model non-ascii", 404, "model_not_found", images=lambda: [red()], params={"model": "模型"}),
    C("model empty", 404, "model_not_found", images=lambda: [red()], params={"model": ""}),
    C(
        "model of another task",
        404,
        "model_not_found",
        path="/v1/detect",
        images=lambda: [red()],
        params={"model": "colours"},
    ),
    # methods, paths, keys
    C("GET classify", 405, "method_not_allowed", method="GET"),
    C("DELETE models", 405, "method_not_allowed", method="DELETE", path="/v1/models"),
    C("PUT detect", 405, "method_not_allowed", method="PUT", path="/v1/detect"),
    C("non-ascii path", 404, "not_found", method="GET", path="/v1/%C3%A9t%C3%A9"),
    C("unknown path", 404, "not_found", method="GET", path="/v1/nope"),
    C("path below an endpoint", 404, "not_found", path="/v1/classify/more", images=lambda: [red()]),
    C("no api key", 401, "unauthorized", images=lambda: [red()], auth=False),
    C(
        "basic auth",
        401,
        "unauthorized",
        images=lambda: [red()],
        auth=False,
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
    ),
]


def send(service, case: Case) -> requests.Response:
    headers = {**(AUTH if case.auth else {}), **case.headers}
    files = (
        [("image", (f"{i}.bin", d)) for i, d in enumerate(case.images())] if case.images else None
    )
    data = case.body() if case.body else None
    if data is not None and "Content-Type" not in case.headers:
        headers["Content-Type"] = ""  # requests would send none for bytes: say so explicitly
    return requests.request(
        case.method,
        service.url + case.path,
        files=files,
        data=data,
        params=case.params,
        headers=headers,
        timeout=120,
    )


def test_the_table_has_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_status_and_code(service, case):
    r = send(service, case)
    assert r.status_code == case.status, r.text[:300]
    if case.code is None:
        assert r.headers["content-type"].startswith("application/json")
        assert len(r.json()["results"]) == 1
    else:
        body = r.json()
        assert set(body) == {"error"} and body["error"]["code"] == case.code, body
        assert body["error"]["message"]


def _pixels_json(h: int, w: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (1, h, w, 3)).tolist()
    return json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, h, w, 3], "data": pixels}]}
    ).encode()


V2_CASES = [  # (name, body, headers, status): the protocol's error body, {"error": "..."}
    ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, {}, 422),
    ("not an object", b'"infer"', {}, 422),
    ("not json", b"\xff\xfe", {}, 422),
    ("header length beyond the body", b"{}", {"Inference-Header-Content-Length": "99"}, 422),
    ("header length not a number", b"{}", {"Inference-Header-Content-Length": "x"}, 422),
    ("1.4 MB of JSON pixels", _pixels_json(240, 320), {}, 200),  # parsed off the event loop
]


@pytest.mark.parametrize("case", V2_CASES, ids=[c[0] for c in V2_CASES])
def test_protocol_bodies_get_their_status(service, case):
    _, body, headers, status = case
    r = requests.post(
        service.url + "/v2/models/colours/infer",
        data=body,
        timeout=120,
        headers={**AUTH, "Content-Type": "application/json", **headers},
    )
    assert r.status_code == status, r.text[:300]
    if status != 200:
        assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_a_lying_content_length_gets_408_not_a_hang(service):
    head = head_of("/v1/classify", {"Content-Type": "image/jpeg", "Content-Length": "100000"})
    started = time.monotonic()
    status, _, body = raw_request(service.url, head, [red()[:1000]], timeout=60)
    assert status == 408 and b"request_timeout" in body, (status, body)
    assert time.monotonic() - started < BODY_TIMEOUT_S + 10


def test_a_slow_body_is_cut_off_and_others_are_served_meanwhile(service):
    data = red()
    head = head_of("/v1/classify", {"Content-Type": "image/jpeg", "Content-Length": str(len(data))})
    parts = [data[i : i + 100] for i in range(0, len(data), 100)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        slow = [pool.submit(raw_request, service.url, head, parts, 0.5) for _ in range(8)]
        time.sleep(1)
        fast = service.post("/v1/classify", [data])  # served while eight clients dribble
        assert fast.status_code == 200
        for future in slow:
            status, _, body = future.result()
            assert status == 408 and b"request_timeout" in body, (status, body)


def test_chunked_body_over_the_limit_is_refused_while_streaming(service):
    def chunks():
        for _ in range(30):
            yield b"\x00" * 100_000

    r = requests.post(
        service.url + "/v1/classify",
        data=chunks(),
        timeout=60,
        headers={**AUTH, "Content-Type": "image/png"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_a_content_length_shorter_than_the_body(service):
    """The server reads what Content-Length says; the rest is not taken as another request's
    image."""
    data = red()
    head = head_of("/v1/classify", {"Content-Type": "image/jpeg", "Content-Length": "100"})
    status, _, body = raw_request(service.url, head + data)
    assert status == 400 and b"invalid_image" in body


# ------------------------------------------------------------- slots, labels, health


def _metric_lines(service, name: str) -> list[str]:
    return [line for line in service.metrics().splitlines() if line.startswith(name + "{")]


def test_failures_give_back_their_slots(service):
    """Requests that fail anywhere (bad paths, bad names, bad images) give back their
    in-flight slot: three times max_in_flight of them, then the service still serves."""

    def bad(i: int) -> int:
        case = (
            CASES[i % 4]
            if i % 3
            else Case("path", 404, "not_found", method="GET", path="/v1/%C3%A9t%C3%A9")
        )
        return send(service, case).status_code

    # half the limit at a time: a request another test left in flight (a slow body, held for
    # its timeout) must not make this one's refusal a 503
    with concurrent.futures.ThreadPoolExecutor(MAX_IN_FLIGHT // 2) as pool:
        statuses = list(pool.map(bad, range(3 * MAX_IN_FLIGHT)))
    assert all(400 <= s < 500 for s in statuses), [s for s in statuses if not 400 <= s < 500]
    assert service.post("/v1/classify", [red()]).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the gauge is reported every second
        lines = _metric_lines(service, "ray_convnext_serve_in_flight_requests")
        if lines and sum(float(line.rsplit(" ", 1)[1]) for line in lines) == 0:
            break
        time.sleep(1)
    assert lines and sum(float(line.rsplit(" ", 1)[1]) for line in lines) == 0, lines


def test_metric_labels_take_only_names_the_service_chose(service):
    """Names a client made up (a model, a path) are counted as "unknown" and "other", never
    as labels of their own: a client cannot grow the metric series."""
    made_up = "no-such-model-" + "x" * 40
    assert service.post("/v1/classify", [red()], params={"model": made_up}).status_code == 404
    r = requests.get(service.url + "/v1/" + made_up, headers=AUTH, timeout=10)
    assert r.status_code == 404, r.text
    served = {"colours", "boxes", "regions", "unknown"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = _metric_lines(service, "ray_convnext_serve_requests_total")
        # both of this test's requests counted (another test's may have made "unknown" first)
        if any('model="unknown"' in line for line in lines) and any(
            'endpoint="other"' in line for line in lines
        ):
            break
        time.sleep(2)
    models = {re.search(r'model="([^"]*)"', line).group(1) for line in lines}
    endpoints = {re.search(r'endpoint="([^"]*)"', line).group(1) for line in lines}
    assert "unknown" in models and models <= served, models
    known = {
        "classify",
        "detect",
        "segment",
        "models",
        "healthz",
        "readyz",
        "docs",
        "root",
        "other",
        "v2_infer",
        "v2_ready",
        "v2_health",
        "v2_metadata",
        "v2_repository",  # refused here (no admin keys), but counted: Schemathesis calls it
        "pipeline",  # a pipeline Schemathesis names, not served here
    }
    assert "other" in endpoints and endpoints <= known, endpoints
    assert not [line for line in lines if 'status="5' in line]


def test_still_healthy_after_the_table(service):
    assert service.proc.poll() is None
    assert requests.get(service.url + "/readyz", timeout=10).status_code == 200
    r = service.post("/v1/classify", [photo("blue", box=(60, 20, 280, 220))[0]])
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "blue"


# ------------------------------------------------------------------- fuzzing


def test_schemathesis_finds_no_5xx_and_no_answer_off_its_schema(service):
    """Schemathesis (property-based, from the live `/openapi.json`) sends generated requests
    to every operation: no 5xx (but a 503 when a queue is full) and every documented answer
    matches its schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_url(service.url + "/openapi.json", headers=AUTH)
    schema.config.phases.coverage.enabled = False  # generated examples, bounded below
    schema.config.checks.not_a_server_error.expected_statuses = ["2xx", "3xx", "4xx", "503"]
    operations, statuses = 0, []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case) -> None:
            checks = [not_a_server_error, response_schema_conformance]
            response = case.call_and_validate(headers=AUTH, timeout=60, checks=checks)
            statuses.append(response.status_code)

        check()
        operations += 1
    assert operations >= 10 and len(statuses) >= 4 * operations, (operations, len(statuses))
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert requests.get(service.url + "/readyz", timeout=10).status_code == 200


# ------------------------------------------------------------------------ load


def _replicas(service) -> list[psutil.Process]:
    return server_replicas(service.proc.pid)


def _load(
    service, clients: int, seconds: float, on_the_way: Callable[[], None] | None = None
) -> list[tuple[float, int | str, float, dict]]:
    return closed_loop(service.url + "/v1/classify", red(), clients, seconds, AUTH, on_the_way)


def test_overload_is_refused_fast_and_the_service_recovers(service):
    """Ten times what the model queues hold: the excess gets 503 + Retry-After, every other
    request its answer, no queue grows (replica memory stays flat), and right after the
    service answers as before."""
    rss = lambda: sum(p.memory_info().rss for p in _replicas(service))  # noqa: E731
    # a first short burst: a replica that has not yet run full batches (one just started in
    # place of a killed one) grows to its working size in it; then the growth is the queues'
    _load(service, clients=10 * CAPACITY * 2, seconds=2)
    before = rss()
    results = _load(service, clients=10 * CAPACITY * 2, seconds=10)
    statuses = [s for _, s, _, _ in results]
    assert set(statuses) <= {200, 503}, sorted({str(s) for s in statuses})
    assert 200 in statuses and 503 in statuses
    refusals = [(lat, h) for _, s, lat, h in results if s == 503]
    assert all(int(h["Retry-After"]) >= 1 for _, h in refusals)
    # most are HAProxy's, before any replica: its answers carry no `server: uvicorn`
    by_haproxy = [h for _, h in refusals if "server" not in h]
    assert len(by_haproxy) > 0.9 * len(refusals), (len(by_haproxy), len(refusals))
    assert rss() - before < 300 * 2**20, (before, rss())
    started = time.monotonic()
    assert service.post("/v1/classify", [red()]).status_code == 200
    assert time.monotonic() - started < 5


def test_a_killed_replica_fails_almost_nothing(service):
    """SIGKILL one of two replicas under steady load: Serve replaces it, HAProxy retries what
    the dead one held on the other, under 1% fail and no client sees a 500."""
    victim = _replicas(service)[0]
    kill_at = []

    def kill() -> None:
        kill_at.append(time.monotonic())
        victim.send_signal(signal.SIGKILL)

    started = time.monotonic()
    results = _load(service, clients=6, seconds=30, on_the_way=kill)
    killed = kill_at[0] - started
    failed = [(t, s) for t, s, _, _ in results if s != 200]
    # no 500 and no dropped connection: HAProxy has each request whole and replays it
    assert not [f for f in failed if f[1] != 503], failed
    assert len(failed) <= 0.01 * len(results), (len(failed), len(results))
    after = sorted(t for t, s, _, _ in results if s == 200 and t > killed)
    gaps = np.diff([killed, *after])
    assert after and gaps.max() < 15, gaps.max()
    deadline = time.monotonic() + 120  # Serve starts a replacement
    while time.monotonic() < deadline and not (
        len(_replicas(service)) == 2 and victim.pid not in {p.pid for p in _replicas(service)}
    ):
        time.sleep(1)
    assert len(_replicas(service)) == 2
    deadline = time.monotonic() + 120
    while requests.get(service.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)


def wait_until_working(replicas: list[psutil.Process], cpu_s: float = 0.5) -> None:
    """Until each replica has spent `cpu_s` of CPU since the call: the requests sent just
    before are being worked on everywhere (an event to act on, where a sleep would guess)."""

    def used(p: psutil.Process) -> float:
        times = p.cpu_times()
        return times.user + times.system

    start = {p.pid: used(p) for p in replicas}
    deadline = time.monotonic() + 60
    while any(used(p) - start[p.pid] < cpu_s for p in replicas):
        assert time.monotonic() < deadline, "the replicas never started on the requests"
        time.sleep(0.05)


def test_requests_a_killed_replica_was_working_on_are_answered_by_the_other(service):
    """Segmentations in flight (seconds of work each) on both replicas, one replica killed:
    HAProxy has the whole request buffered (`convnext-serve-haproxy`), replays the dead one's
    on the other replica, and every client gets its answer."""
    image = png_rows(4000, 3000)  # a 12 MP map: seconds of work, a small body
    assert len(image) < 256 << 10
    replicas = _replicas(service)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(service.post, "/v1/segment", [image]) for _ in range(4)]
        wait_until_working(replicas)
        assert not any(f.done() for f in futures), "the requests were not in flight"
        replicas[0].send_signal(signal.SIGKILL)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 4
    deadline = time.monotonic() + 120  # Serve replaces it; the service is whole again
    while not (
        len(_replicas(service)) == 2
        and requests.get(service.url + "/readyz", timeout=10).status_code == 200
    ):
        assert time.monotonic() < deadline
        time.sleep(1)


def test_sigterm_finishes_the_requests_in_flight(tmp_path):
    """SIGTERM with segmentations in flight (12-megapixel maps take seconds): every one is
    answered, then the process exits."""
    ckpt = service_checkpoints()
    models = [{"name": "regions", "checkpoint": str(ckpt["segment"]), "max_batch_size": 1}]
    for svc in run_service(tmp_path, models, {}):
        image = png_rows(4000, 3000)
        children = psutil.Process(svc.proc.pid).children(recursive=True)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(svc.post, "/v1/segment", [image]) for _ in range(3)]
            wait_until_working(server_replicas(svc.proc.pid))
            assert not any(f.done() for f in futures), "the requests were not in flight"
            stopped_at = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200] * 3
        assert svc.proc.wait(timeout=60) == 0
        assert time.monotonic() - stopped_at < 30
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline()[:2] for p in alive]
