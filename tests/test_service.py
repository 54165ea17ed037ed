"""The service end to end: `convnext-serve run` (real Ray Serve) over real HTTP.

One service for the whole module, started as a user would start it, with small checkpoints
trained by the project's own training library (`service_models.py`).
"""

import base64
import concurrent.futures
import io
import re
import signal
import time

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from models.masks import decode_rle
from models.train.progress import write_progress

from .colour_shapes import COLOURS, background, draw
from .drawn_shapes import box_iou
from .live_service import API_KEY, AUTH, get_json, run_service, server_replicas
from .service_models import service_checkpoints
from .test_imaging import png_header

pytestmark = pytest.mark.needs_models("service")

METRICS = [
    "convnext_serve_requests_total",
    "convnext_serve_request_duration_seconds",
    "convnext_serve_images_total",
    "convnext_serve_batch_size",
    "convnext_serve_batch_inference_seconds",
    "convnext_serve_queue_wait_seconds",
    "convnext_serve_decode_seconds",
    "convnext_serve_in_flight_requests",
    "convnext_serve_model_info",
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ckpt = service_checkpoints()
    models = [
        {
            "name": "colours",
            "checkpoint": str(ckpt["classify"]),
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
            "warmup_batches": 30,
        },
        # a long warm-up: /readyz must say 503 while the rest already serves
        {
            "name": "boxes",
            "checkpoint": str(ckpt["detect"]),
            "max_batch_size": 4,
            "warmup_batches": 30,
        },
        {"name": "regions", "checkpoint": str(ckpt["segment"]), "max_batch_size": 4},
        {
            "name": "one-at-a-time",
            "checkpoint": str(ckpt["classify"]),
            "max_batch_size": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "warmup_batches": 0,
        },
        {
            "name": "impatient",
            "checkpoint": str(ckpt["segment"]),
            "timeout_s": 0.001,
            "warmup_batches": 0,
            "num_cpus": 0.5,
        },
    ]
    gateway = {"max_body_bytes": 2_000_000, "max_pixels": 4_000_000}
    folder = tmp_path_factory.mktemp("service")
    # a model still training: listed with the progress its run writes, refused until served
    progress = folder / "later.progress.json"
    write_progress(progress, state="training", epoch=2, epochs=10, fraction=0.15, eta_s=42)
    later = {"name": "later-regions", "checkpoint": str(ckpt["segment"]), "warmup_batches": 3}
    training = [
        {
            "name": "later-regions",
            "task": "segment",
            "progress_file": str(progress),
            "serve_as": later,
        }
    ]
    chain = {
        "name": "colour-boxes",
        "detector": "boxes",
        "steps": [{"model": "colours", "top_k": 3}],
    }
    pipelines = [
        chain,
        {**chain, "name": "one-box", "max_boxes": 1},
        {**chain, "name": "no-room", "max_crop_pixels": 1},
    ]
    started = run_service(folder, models, gateway, training=training, pipelines=pipelines)
    service = next(started)
    yield service
    # Ctrl-C stops everything, checked once the module's tests are done with the service
    children = [p for p in service.children if p.is_running()]
    service.proc.send_signal(signal.SIGINT)
    assert service.proc.wait(timeout=90) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline()[:2] for p in alive]
    started.close()


# ------------------------------------------------------------------------------ images


def photo(
    colour: str, size=(320, 240), box=(60, 50, 160, 150), disc=False, fmt="JPEG", mode="RGB"
) -> tuple[bytes, np.ndarray]:
    """An image of `size` (W, H) with one object of `colour` in `box`; and its true mask."""
    w, h = size
    image = background(np.random.default_rng(1), h, w)
    mask = draw(image, colour, box, disc)
    pil = Image.fromarray(image)
    if mode != "RGB":
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue(), mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def error_of(response: requests.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return body["error"]["code"]


# ------------------------------------------------------------------------------- tests


def test_readyz_was_503_until_the_models_were_warm(service):
    """/readyz says 503 while a model warms up, the protocol's readiness a 4xx (400); both
    200 once every model is warm."""
    seen = service.readiness
    assert seen[-1][1:] == (200, 200) and seen[-1][0] == 200
    warming = (200, 503, 400)
    assert warming in seen, f"never saw the server up with models still warming: {seen}"


def test_classify_answers_the_colour_in_every_format(service):
    cases = [
        ("red", "JPEG", "RGB"),
        ("green", "PNG", "RGBA"),
        ("blue", "WEBP", "RGB"),
        ("red", "BMP", "RGB"),
        ("green", "GIF", "P"),
        ("blue", "TIFF", "RGB"),
    ]
    big = (60, 20, 280, 220)  # the object fills most of the picture, as in the training data
    cases = cases + cases[::-1]  # 12 images: more than a batch of this model (8)
    images = [
        photo(c, box=big, fmt=f, mode=m, disc=i % 2 == 1)[0] for i, (c, f, m) in enumerate(cases)
    ]
    r = service.post("/v1/classify", images, params={"top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "colours" and len(body["results"]) == len(cases)
    for (colour, _, _), result in zip(cases, body["results"], strict=True):  # input order kept
        top = result["predictions"]
        assert len(top) == 2 and top[0]["label"] == colour, (colour, top)
        assert top[0]["class_id"] == sorted(COLOURS).index(colour)
        assert top[0]["score"] >= top[1]["score"]


def test_the_hot_path_answers_as_the_full_route_does(service):
    """`POST /v1/classify` with a plain query takes the fast lane (`routes.fast_lane`); one
    with a parameter FastAPI ignores takes the full route: the same answer, byte for byte."""
    from service.routes import fast_lane

    def lane(query: bytes, path="/v1/classify", method="POST"):
        return fast_lane({"path": path, "method": method, "query_string": query})

    assert lane(b"") and lane(b"top_k=3&model=colours") and lane(b"top_k=1000")
    for query in (b"top_k=0", b"top_k=1001", b"top_k=+3", b"top_k=many", b"other=1"):
        assert lane(query) is None, query
    assert lane(b"", path="/v1/detect") is None and lane(b"", method="GET") is None
    data, _ = photo("green", box=(60, 20, 280, 220))
    fast = service.post("/v1/classify", [data], params={"top_k": 3})
    full = service.post("/v1/classify", [data], params={"top_k": 3, "via": "route"})
    assert fast.status_code == full.status_code == 200
    assert (
        fast.content == full.content
        and fast.headers["content-type"] == full.headers["content-type"]
    )
    bad = [service.post("/v1/classify", [b"not an image"], params=p) for p in ({}, {"via": 1})]
    assert bad[0].status_code == bad[1].status_code == 400 and bad[0].json() == bad[1].json()


def test_classify_takes_a_raw_image_body(service):
    data, _ = photo("blue", size=(640, 480), box=(100, 100, 500, 400))
    r = requests.post(
        service.url + "/v1/classify",
        data=data,
        headers={**AUTH, "Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "blue"


@pytest.mark.parametrize(
    "size, box", [((320, 240), (60, 50, 180, 170)), ((200, 400), (50, 200, 150, 300))]
)
def test_detect_finds_the_object_in_original_coordinates(service, size, box):
    data, truth = photo("green", size=size, box=box)
    r = service.post("/v1/detect", [data], params={"score_threshold": 0.3})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["width"], result["height"]) == size
    best = result["detections"][0]
    assert best["label"] == "green"
    assert box_iou(best["box"], box) >= 0.7, best["box"]
    mask = decode_rle(best["mask"])
    assert mask.shape == truth.shape and iou(mask, truth) >= 0.8


def test_detect_options_and_render(service):
    data, _ = photo("red", box=(40, 40, 140, 140))
    r = service.post(
        "/v1/detect", [data], params={"masks": "false", "max_detections": 1, "score_threshold": 0.0}
    )
    dets = r.json()["results"][0]["detections"]
    assert len(dets) == 1 and "mask" not in dets[0]
    r = service.post("/v1/detect", [data], params={"render": "true"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (320, 240)


def test_segment_labels_the_pixels(service):
    data, truth = photo("blue", size=(256, 192), box=(30, 40, 130, 140), disc=True, fmt="PNG")
    r = service.post("/v1/segment", [data])
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["width"], result["height"]) == (256, 192)
    class_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"]["data"]))))
    blue = 1 + sorted(COLOURS).index("blue")
    assert class_map.shape == truth.shape and iou(class_map == blue, truth) >= 0.8
    fractions = {c["label"]: c["pixel_fraction"] for c in result["classes"]}
    assert fractions["blue"] == pytest.approx(truth.mean(), abs=0.05)
    png = service.post("/v1/segment", [data], params={"format": "png"})
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), class_map)
    rendered = service.post("/v1/segment", [data], params={"render": "true"})
    assert Image.open(io.BytesIO(rendered.content)).size == (256, 192)


def test_models_lists_metadata_and_settings(service):
    models = get_json(service.url + "/v1/models", headers=AUTH)["models"]
    by_name = {m["name"]: m for m in models}
    assert by_name["colours"]["task"] == "classify" and by_name["colours"]["ready"]
    assert by_name["colours"]["metadata"]["labels"] == sorted(COLOURS)
    assert by_name["colours"]["serving"]["max_batch_size"] == 8
    assert by_name["boxes"]["metadata"]["task"] == "detect"


def test_a_model_in_training_is_refused_with_503_then_joins_the_replica_once_done(service):
    """Listed with its progress and refused while training; then `serve_as`: the replica
    loads and warms the model beside the served ones, without a restart, and /readyz says
    ready throughout."""
    ready = get_json(service.url + "/readyz")
    (listed,) = get_json(service.url + "/v1/models", headers=AUTH)["training"]
    assert ready["training"] == [listed] and "later-regions" not in ready["models"]
    assert listed["name"] == "later-regions" and listed["task"] == "segment"
    assert (listed["state"], listed["epoch"], listed["fraction"]) == ("training", 2, 0.15)
    data, _ = photo("red", box=(60, 20, 280, 220))
    r = service.post("/v1/segment", [data], params={"model": "later-regions"})
    assert r.status_code == 503 and error_of(r) == "model_training"
    assert "15% done" in r.json()["error"]["message"] and r.headers["Retry-After"] == "42"
    assert service.post("/v1/detect", [data], params={"model": "later-regions"}).status_code == 404
    assert service.post("/v1/segment", [data]).status_code == 200  # the task's served model

    replicas = {p.pid for p in server_replicas(service.proc.pid)}
    progress = service.log_path.parent / "later.progress.json"
    write_progress(progress, state="done", epoch=10, epochs=10, fraction=1.0)
    readiness, deadline = set(), time.monotonic() + 120
    while time.monotonic() < deadline:
        readiness.add(requests.get(service.url + "/readyz", timeout=10).status_code)
        r = service.post("/v1/segment", [data], params={"model": "later-regions"})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and error_of(r) == "model_training", r.text
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["model"] == "later-regions", r.text
    assert readiness == {200}
    listed = get_json(service.url + "/v1/models", headers=AUTH)
    assert listed["training"] == [] and "later-regions" in {m["name"] for m in listed["models"]}
    alive = {p.pid for p in server_replicas(service.proc.pid)}
    assert replicas and replicas <= alive, "a replica was restarted"


def test_docs_show_every_endpoint(service):
    spec = get_json(service.url + "/openapi.json")
    for path in ("/v1/classify", "/v1/detect", "/v1/segment", "/v1/models", "/healthz"):
        assert path in spec["paths"]
    params = {p["name"] for p in spec["paths"]["/v1/detect"]["post"]["parameters"]}
    assert {"model", "score_threshold", "max_detections", "masks", "render"} <= params
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert requests.get(service.url + "/docs", timeout=10).status_code == 200


BAD_INPUTS = [
    ("undecodable", "/v1/classify", [b"this is not an image"], {}, 400, "invalid_image"),
    ("empty", "/v1/classify", [b""], {}, 400, "invalid_image"),
    ("truncated", "/v1/detect", ["truncated"], {}, 400, "invalid_image"),
    ("huge header", "/v1/classify", [png_header(100_000, 100_000)], {}, 413, "image_too_large"),
    ("top_k 0", "/v1/classify", ["ok"], {"top_k": 0}, 422, "invalid_parameter"),
    ("top_k text", "/v1/classify", ["ok"], {"top_k": "many"}, 422, "invalid_parameter"),
    ("threshold", "/v1/detect", ["ok"], {"score_threshold": 1.5}, 422, "invalid_parameter"),
    ("max_detections", "/v1/detect", ["ok"], {"max_detections": 0}, 422, "invalid_parameter"),
    ("masks", "/v1/detect", ["ok"], {"masks": "perhaps"}, 422, "invalid_parameter"),
    ("format", "/v1/segment", ["ok"], {"format": "gif"}, 422, "invalid_parameter"),
    ("render two", "/v1/detect", ["ok", "ok"], {"render": "true"}, 422, "invalid_parameter"),
    ("png of two", "/v1/segment", ["ok", "ok"], {"format": "png"}, 422, "invalid_parameter"),
    ("render two maps", "/v1/segment", ["ok", "ok"], {"render": "true"}, 422, "invalid_parameter"),
    ("unknown model", "/v1/classify", ["ok"], {"model": "nope"}, 404, "model_not_found"),
    ("wrong task", "/v1/detect", ["ok"], {"model": "colours"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(service, case):
    _, path, images, params, status, code = case
    good, _ = photo("red")
    images = [
        good if x == "ok" else good[: len(good) // 2] if x == "truncated" else x for x in images
    ]
    r = service.post(path, images, params=params)
    assert r.status_code == status, r.text
    assert error_of(r) == code


def test_body_and_content_type_limits(service):
    big = b"\xff" * 2_500_000
    r = service.post("/v1/classify", [big])
    assert r.status_code == 413 and error_of(r) == "payload_too_large"

    def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(25):
            yield b"\x00" * 100_000

    r = requests.post(
        service.url + "/v1/classify",
        data=chunks(),
        timeout=60,
        headers={**AUTH, "Content-Type": "image/png"},
    )
    assert r.status_code == 413 and error_of(r) == "payload_too_large"
    r = requests.post(
        service.url + "/v1/classify",
        data=b"hello",
        timeout=10,
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    assert r.status_code == 415 and error_of(r) == "unsupported_media_type"
    r = requests.post(
        service.url + "/v1/classify", files={"picture": b"x"}, headers=AUTH, timeout=10
    )
    assert r.status_code == 422 and error_of(r) == "invalid_parameter"


def test_api_keys_guard_v1_but_not_health(service):
    data, _ = photo("red")
    assert service.post("/v1/classify", [data], headers={}).status_code == 401
    r = service.post("/v1/classify", [data], headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and error_of(r) == "unauthorized"
    ok = service.post("/v1/classify", [data], headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    assert requests.get(service.url + "/v1/models", timeout=10).status_code == 401
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(service.url + "/readyz", timeout=10).status_code == 200


def test_full_queue_answers_503_with_retry_after(service):
    data, _ = photo("green")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(
                lambda _: service.post("/v1/classify", [data], params={"model": "one-at-a-time"}),
                range(16),
            )
        )
    statuses = [r.status_code for r in responses]
    assert 503 in statuses and 200 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert "json" in refused.headers.get("content-type", ""), (refused.headers, refused.text)
    assert error_of(refused) == "overloaded" and int(refused.headers["Retry-After"]) >= 1


def test_slow_model_answers_504(service):
    data, _ = photo("red")
    r = service.post("/v1/segment", [data], params={"model": "impatient"})
    assert r.status_code == 504 and error_of(r) == "timeout"


def test_still_healthy_after_all_that(service):
    assert service.proc.poll() is None
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200
    data, _ = photo("blue", box=(60, 20, 280, 220))
    r = service.post("/v1/classify", [data])
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "blue"


def _sample(text: str, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def batch_counts(service) -> tuple[float, float]:
    """The colours model's batches so far, and how many of them held one image."""
    text = service.metrics()
    return (
        _sample(text, "ray_convnext_serve_batch_size_count", model="colours"),
        _sample(text, "ray_convnext_serve_batch_size_bucket", model="colours", le="1.0"),
    )


def test_concurrent_requests_form_batches(service):
    data, _ = photo("red")
    batches_before, singles_before = batch_counts(service)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses = list(
            pool.map(lambda _: service.post("/v1/classify", [data]).status_code, range(48))
        )
    assert statuses == [200] * 48
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the metrics are exported every few seconds
        batches, singles = batch_counts(service)
        if batches - batches_before > singles - singles_before:
            break
        time.sleep(1)
    # of the batches these 48 one-image requests made, some held more than one image
    assert batches - batches_before > singles - singles_before, "every batch had one image"


def test_multi_image_requests_batch_with_other_requests(service):
    """A request's images go into a batch together and other requests' join them: with
    requests of three images each, batches of more than four (up to eight) mix requests."""

    def mixed_batches() -> float:
        text = service.metrics()
        return _sample(
            text, "ray_convnext_serve_batch_size_bucket", model="colours", le="8.0"
        ) - _sample(text, "ray_convnext_serve_batch_size_bucket", model="colours", le="4.0")

    before = mixed_batches()
    images = [photo(c)[0] for c in ("red", "green", "blue")]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: service.post("/v1/classify", images), range(48)))
    assert all(r.status_code == 200 and len(r.json()["results"]) == 3 for r in responses)
    deadline = time.monotonic() + 60
    while mixed_batches() <= before and time.monotonic() < deadline:
        time.sleep(1)
    assert mixed_batches() > before


def test_answers_match_the_documented_schemas(service):
    """The pydantic models behind /docs (service/schemas.py) describe what is really sent."""
    from service.schemas import ClassifyResponse, DetectResponse, ModelsResponse, SegmentResponse

    data, _ = photo("red", box=(60, 20, 280, 220))
    ClassifyResponse.model_validate(service.post("/v1/classify", [data]).json())
    for masks in ("true", "false"):  # at the served threshold: the red object, found
        r = service.post("/v1/detect", [data], params={"masks": masks})
        assert (
            r.status_code == 200 and DetectResponse.model_validate(r.json()).results[0].detections
        )
    SegmentResponse.model_validate(service.post("/v1/segment", [data]).json())
    models = requests.get(service.url + "/v1/models", headers=AUTH, timeout=10)
    ModelsResponse.model_validate(models.json())


def test_every_documented_metric_is_exported(service):
    data, _ = photo("red", box=(60, 20, 280, 220))
    for path in ("/v1/classify", "/v1/detect", "/v1/segment"):  # this test's own traffic
        assert service.post(path, [data]).status_code == 200
    info = {
        name: re.compile(
            rf'^ray_convnext_serve_model_info{{(?=.*model="{name}")'
            rf'(?=.*task="{task}")(?=.*device="cpu").*}} 1(?:\.0)?$',
            re.M,
        )
        for name, task in (("colours", "classify"), ("boxes", "detect"), ("regions", "segment"))
    }
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = service.metrics()
        missing = [
            m for m in METRICS if not re.search(rf"^ray_{m}(_bucket|_count|_sum)?{{", text, re.M)
        ]
        missing += [f"model_info of {name}" for name, line in info.items() if not line.search(text)]
        if not missing:
            break
        time.sleep(2)
    assert not missing, missing
    assert "ray_serve_" in text  # Ray Serve's own series at the same target


def test_http_enters_through_haproxy(service):
    """The HTTP port belongs to Ray Serve's HAProxy front, not to the Python proxy actor."""
    port = int(service.url.rsplit(":", 1)[1])
    listeners = [
        p.name()
        for p in service.children
        if p.is_running()
        for c in p.net_connections("tcp")
        if c.status == "LISTEN" and c.laddr.port == port
    ]
    assert listeners and set(listeners) == {"haproxy"}, listeners


# --------------------------------------------------------------------------- pipelines


def scene_png(*objects: tuple[str, tuple[int, int, int, int], bool], size=(160, 120)) -> bytes:
    """A PNG (lossless: a client's crops hold the pixels the replica's do) of these objects
    (colour, box, disc) on the training data's kind of background."""
    image = background(np.random.default_rng(5), size[1], size[0])
    for colour, box, disc in objects:
        draw(image, colour, box, disc)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def two_objects() -> bytes:
    return scene_png(("red", (12, 14, 62, 64), False), ("blue", (92, 46, 146, 100), True))


def client_crop(pixels: np.ndarray, box: list[float], margin: float) -> tuple[bytes, list[int]]:
    """What a client does without pipelines: cut the box with its margin, encode it (PNG);
    and where it cut."""
    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    left, top = max(0, int(np.floor(x1 - margin * w))), max(0, int(np.floor(y1 - margin * h)))
    right = min(width, int(np.ceil(x2 + margin * w)))
    bottom = min(height, int(np.ceil(y2 + margin * h)))
    buf = io.BytesIO()
    Image.fromarray(pixels[top:bottom, left:right]).save(buf, format="PNG")
    return buf.getvalue(), [left, top, right, bottom]


def test_a_pipeline_answers_as_detect_then_classify_of_each_crop_would(service):
    """The pipeline's boxes are /v1/detect's, and each box's classes are what /v1/classify
    answers for the client's own crop of it: labels exact, scores to a tolerance (batches of
    other sizes round differently)."""
    from service.schemas import PipelineResponse

    data = two_objects()
    r = service.post("/v1/pipelines/colour-boxes", [data])
    assert r.status_code == 200, r.text
    answer = PipelineResponse.model_validate(r.json())
    assert (answer.pipeline, answer.detector.model) == ("colour-boxes", "boxes")
    piped = r.json()["results"][0]["detections"]
    detected = service.post("/v1/detect", [data], params={"masks": "false"}).json()
    assert [(d["label"], d["box"]) for d in piped] == [
        (d["label"], d["box"]) for d in detected["results"][0]["detections"]
    ]
    assert {d["label"] for d in piped} == {"red", "blue"}, piped
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for d in piped:
        crop, rect = client_crop(pixels, d["box"], margin=0.1)
        assert d["crop"] == rect
        alone = service.post("/v1/classify", [crop], params={"model": "colours", "top_k": 3})
        expected = alone.json()["results"][0]["predictions"]
        got = d["classify"]["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-3)
        assert (d["classify"]["model"], d["classify"]["version"]) == ("colours", "1")
        assert got[0]["label"] == d["label"]  # the colour inside each box


def test_a_pipelines_bounds_are_answered_on_each_box(service):
    """Boxes beyond `max_boxes` and crops beyond `max_crop_pixels` are answered with the
    reason on the box, the request with 200, and counted by what became of them; a pipeline
    not served is a 404."""

    def counted() -> dict[tuple[str, str], float]:
        text = service.metrics()
        boxes = {
            (p, o): _sample(text, "ray_convnext_serve_pipeline_boxes_total", pipeline=p, outcome=o)
            for p in ("one-box", "no-room")
            for o in ("sent", "held_back")
        }
        stage = "ray_convnext_serve_pipeline_stage_seconds_count"
        boxes[("one-box", "second stage")] = _sample(
            text, stage, pipeline="one-box", stage="second"
        )
        return boxes

    before = counted()
    data = two_objects()
    r = service.post("/v1/pipelines/one-box", [data])
    first, *rest = r.json()["results"][0]["detections"]
    assert "classify" in first and "error" not in first and rest
    for d in rest:
        assert "classify" not in d
        assert d["error"] == "not sent on: the pipeline takes 1 boxes an image (max_boxes)"
    r = service.post("/v1/pipelines/no-room", [data])
    assert r.status_code == 200
    held = r.json()["results"][0]["detections"]
    for d in held:
        assert "classify" not in d and "(max_crop_pixels)" in d["error"]
    expected = {
        ("one-box", "sent"): 1,
        ("one-box", "held_back"): len(rest),
        ("no-room", "sent"): 0,
        ("no-room", "held_back"): len(held),
        ("one-box", "second stage"): 1,
    }
    deadline = time.monotonic() + 60
    grown = {}
    while time.monotonic() < deadline:
        now = counted()
        grown = {key: now[key] - before[key] for key in expected}
        if grown == expected:
            break
        time.sleep(1)
    assert grown == expected
    r = service.post("/v1/pipelines/nowhere", [data])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "no pipeline 'nowhere'" in r.json()["error"]["message"]


def test_crops_of_different_requests_share_the_second_models_batches(service):
    """Requests of one object each, sent together: the classifier's batches hold more crops
    than any one request sends (so crops of several requests), and each answer is its own
    object's colour."""
    from service.metrics import BATCH_BUCKETS

    def larger_batches() -> dict[int, float]:
        """Batches of more than each bucket's bound (as far as the histogram's buckets tell)."""
        text = service.metrics()
        name = "ray_convnext_serve_batch_size_bucket"
        every = _sample(text, name, model="colours", le="+Inf")
        return {b: every - _sample(text, name, model="colours", le=f"{b}.0") for b in BATCH_BUCKETS}

    before = larger_batches()
    colours = ["red", "green", "blue"] * 8
    images = {c: scene_png((c, (40, 30, 100, 90), False)) for c in set(colours)}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(
            pool.map(lambda c: service.post("/v1/pipelines/colour-boxes", [images[c]]), colours)
        )
    most = 0  # the most crops one request sent on
    for colour, r in zip(colours, responses, strict=True):
        assert r.status_code == 200, r.text
        [best, *others] = r.json()["results"][0]["detections"]
        assert best["classify"]["predictions"][0]["label"] == colour
        most = max(most, 1 + sum("classify" in d for d in others))
    bound = next(b for b in BATCH_BUCKETS if b >= most)
    assert bound < 8, most  # the classifier's batches are of 8 at most
    deadline = time.monotonic() + 60
    while larger_batches()[bound] <= before[bound] and time.monotonic() < deadline:
        time.sleep(1)
    assert larger_batches()[bound] > before[bound], (most, before)
