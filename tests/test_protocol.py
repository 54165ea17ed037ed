"""The Open Inference Protocol (`/v2`) end to end, with NVIDIA's own client (`tritonclient`).

A service of its own (one model per task), started as a user starts it; every answer is
checked against `/v1` for the same images.
"""

import base64
import io
import json
import re
import struct
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from models.masks import decode_rle
from models.train.progress import write_progress
from service.grpc_api import SERVICER

from .colour_shapes import COLOURS
from .live_service import AUTH, counted_since, free_port, get_json, request_counts, run_service
from .service_models import relabelled, service_checkpoints
from .test_service import client_crop, photo, two_objects

pytestmark = pytest.mark.needs_models("service")

BIG = (60, 20, 280, 220)  # the object fills most of the picture, as in the training data


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ckpt = service_checkpoints()
    folder = tmp_path_factory.mktemp("protocol")
    # "shades": two versions, the second the same model with its labels in capitals, taking no
    # traffic unless named
    upper = relabelled(ckpt["classify"], folder / "upper.safetensors", str.upper)
    shades = [
        {"version": 1, "checkpoint": str(ckpt["classify"]), "weight": 1},
        {"version": 2, "checkpoint": str(upper), "weight": 0},
    ]
    models = [
        {"name": "colours", "checkpoint": str(ckpt["classify"]), "max_batch_size": 8},
        {"name": "boxes", "checkpoint": str(ckpt["detect"]), "max_batch_size": 4},
        {"name": "shades", "versions": shades, "max_batch_size": 4},
    ]
    # "regions" finished training before the service started: served as if configured
    write_progress(folder / "regions.progress.json", state="done", epoch=1, epochs=1)
    regions = {"name": "regions", "checkpoint": str(ckpt["segment"]), "max_batch_size": 4}
    # and "broken" too, but its checkpoint cannot be read: listed as failed, the rest served
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint")
    broken = {"name": "broken", "checkpoint": str(folder / "broken.safetensors")}
    training = [
        {
            "name": "regions",
            "task": "segment",
            "serve_as": regions,
            "progress_file": str(folder / "regions.progress.json"),
        },
        {
            "name": "broken",
            "task": "classify",
            "serve_as": broken,
            "progress_file": str(folder / "regions.progress.json"),
        },
    ]
    # room for three 320x240 images as JSON numbers
    gateway = {"max_body_bytes": 8_000_000, "max_pixels": 4_000_000}
    grpc = {"grpc_options": {"port": free_port(), "grpc_servicer_functions": [SERVICER]}}
    pipelines = [
        {"name": "colours-in-boxes", "detector": "boxes", "steps": [{"model": "colours"}]},
        # by label: blue boxes segmented, the others classified
        {
            "name": "blue-segmented",
            "detector": "boxes",
            "steps": [{"model": "regions", "classes": ["blue"]}, {"model": "colours", "top_k": 2}],
        },
    ]
    for svc in run_service(folder, models, gateway, grpc, training=training, pipelines=pipelines):
        svc.grpc_url = f"127.0.0.1:{grpc['grpc_options']['port']}"
        yield svc


def test_a_model_trained_before_the_start_is_served_as_if_configured(service):
    listed = get_json(service.url + "/v1/models", headers=AUTH)
    names = [(m["name"], m["version"]) for m in listed["models"]]
    assert names == [
        ("colours", "1"),
        ("boxes", "1"),
        ("shades", "1"),
        ("shades", "2"),
        ("regions", "1"),
    ]
    assert all(m["ready"] for m in listed["models"])
    (failed,) = listed["training"]  # a trained model that cannot be served: said, not fatal
    assert (failed["name"], failed["state"]) == ("broken", "failed")
    assert "cannot be served" in failed["error"]


def auth() -> dict:
    """The API key, in a dict of its own: tritonclient adds its headers to the one it gets."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def client(service):
    return triton.InferenceServerClient(service.url.removeprefix("http://"))


def image_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    else:  # JSON carries encoded images as base64 strings
        b64 = [base64.b64encode(i).decode() for i in images]
        tensor.set_data_from_numpy(np.array(b64, dtype=object), binary_data=False)
    return tensor


def pixels_input(images: list[bytes], binary: bool) -> triton.InferInput:
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(i)).convert("RGB")) for i in images])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def outputs(names: list[str], binary: bool) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(n, binary_data=binary) for n in names]


def test_health_and_metadata(service, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("colours", headers=auth())
    server = client.get_server_metadata()
    assert server["name"] == "convnext-serve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("boxes", headers=auth())
    assert meta["name"] == "boxes" and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {
        ("image", "BYTES"),
        ("pixels", "UINT8"),
    }
    assert {t["name"] for t in meta["outputs"]} == {
        "boxes",
        "scores",
        "class_ids",
        "num_detections",
        "masks",
    }
    assert client.get_model_metadata("colours", "1", headers=auth())["name"] == "colours"
    for path in ("/v2/models/colours/versions/2", "/v2/models/nobody"):
        r = requests.get(service.url + path, headers=auth(), timeout=10)
        assert r.status_code == 404 and set(r.json()) == {"error"}, r.text


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classify_bytes_and_pixels_answer_as_v1(service, client, binary):
    images = [photo(c, box=BIG)[0] for c in ("red", "green", "blue")]
    v1 = service.post("/v1/classify", images, params={"top_k": 2}).json()["results"]
    v1_ids = [[p["class_id"] for p in r["predictions"]] for r in v1]
    v1_scores = [[p["score"] for p in r["predictions"]] for r in v1]
    names = ["scores", "class_ids", "labels"]
    result = client.infer(
        "colours",
        [image_input(images, binary)],
        outputs=outputs(names, binary),
        parameters={"top_k": 2},
        headers=auth(),
    )
    assert result.as_numpy("class_ids").tolist() == v1_ids
    np.testing.assert_allclose(result.as_numpy("scores"), v1_scores, atol=1e-5)
    labels = [
        [x.decode() if isinstance(x, bytes) else x for x in row]
        for row in result.as_numpy("labels").tolist()
    ]
    assert labels == [[p["label"] for p in r["predictions"]] for r in v1]
    # pixels decoded by the client: the same classes (the service's own decode may differ by
    # the JPEG decoder's rounding and draft mode)
    result = client.infer(
        "colours",
        [pixels_input(images, binary)],
        outputs=outputs(names, binary),
        parameters={"top_k": 2},
        headers=auth(),
    )
    assert result.as_numpy("class_ids")[:, 0].tolist() == [ids[0] for ids in v1_ids]


def test_detect_tensors_answer_as_v1(service, client):
    data, _ = photo("red", box=(60, 50, 180, 170))
    params = {"score_threshold": 0.3, "max_detections": 5, "masks": True}
    v1 = service.post("/v1/detect", [data], params=params).json()["results"][0]["detections"]
    assert v1
    result = client.infer("boxes", [image_input([data], True)], parameters=params, headers=auth())
    k = int(result.as_numpy("num_detections")[0])
    assert k == len(v1)
    assert result.as_numpy("boxes").shape == (1, 5, 4)  # padded to max_detections
    np.testing.assert_allclose(result.as_numpy("boxes")[0, :k], [d["box"] for d in v1], atol=0.01)
    assert result.as_numpy("class_ids")[0, :k].tolist() == [d["class_id"] for d in v1]
    assert (result.as_numpy("class_ids")[0, k:] == -1).all()
    masks = result.as_numpy("masks")[0]
    for j, d in enumerate(v1):
        rle = {"size": d["mask"]["size"], "counts": masks[j].decode()}
        assert (decode_rle(rle) == decode_rle(d["mask"])).all()


def test_segment_class_map_answers_as_v1(service, client):
    images = [photo(c, box=BIG)[0] for c in ("green", "blue")]
    v1 = service.post("/v1/segment", images).json()["results"]
    result = client.infer("regions", [image_input(images, True)], headers=auth())
    maps = result.as_numpy("class_map")
    assert maps.shape == (2, 240, 320) and maps.dtype == np.uint8
    for class_map, r in zip(maps, v1, strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(r["mask"]["data"])))
        assert (class_map == np.asarray(png)).all()
    # pixels decoded by the client: the same map but for the JPEG decoders' rounding
    result = client.infer("regions", [pixels_input(images, True)], headers=auth())
    assert (result.as_numpy("class_map") == maps).mean() > 0.95
    # one tensor holds one size: images of two sizes are refused, clearly
    odd = [photo("red")[0], photo("red", size=(200, 100), box=(10, 10, 90, 90))[0]]
    with pytest.raises(InferenceServerException, match="share a size"):
        client.infer("regions", [image_input(odd, True)], headers=auth())


def _infer_raw(service, model: str, header: dict, tail: bytes = b"", headers=None):
    body = json.dumps(header).encode()
    extra = {"Inference-Header-Content-Length": str(len(body))} if tail else {}
    return requests.post(
        f"{service.url}/v2/models/{model}/infer",
        data=body + tail,
        headers={**AUTH, **extra, **(headers or {})},
        timeout=60,
    )


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_bad_tensors_get_clear_4xx_and_the_service_stays_up(service, client):
    jpeg = photo("red")[0]
    good, junk = _bytes_tensor(jpeg), _bytes_tensor(b"nope")

    def image(shape, datatype="BYTES", size=None, name="image") -> dict:
        size = len(good) if size is None else size
        parameters = {"binary_data_size": size}
        return {
            "inputs": [
                {"name": name, "shape": shape, "datatype": datatype, "parameters": parameters}
            ]
        }

    def pixels(shape, data) -> dict:
        return {"inputs": [{"name": "pixels", "shape": shape, "datatype": "UINT8", "data": data}]}

    too_long = {"Inference-Header-Content-Length": "999999"}
    cases = {
        "wrong datatype": (image([1], "FP32"), good, {}),
        "wrong shape": (image([1, 1]), good, {}),
        "wrong element count": (image([2]), good, {}),
        "binary_data_size beyond the body": (image([1], size=len(good) + 10), good, {}),
        "header length beyond the body": (image([1]), good, too_long),
        "unknown input name": (image([1], name="picture"), good, {}),
        "pixels of the wrong shape": (pixels([1, 2, 2], [0] * 4), b"", {}),
        "pixel values beyond 255": (pixels([1, 1, 1, 3], [0, 300, 0]), b"", {}),
        "not an image": (image([1], size=len(junk)), junk, {}),
        "bad parameter": ({**image([1]), "parameters": {"top_k": "many"}}, good, {}),
        "no inputs": ({"inputs": []}, b"", {}),
    }
    for what, (header, tail, headers) in cases.items():
        r = _infer_raw(service, "colours", header, tail, headers)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], what
    not_json = requests.post(
        service.url + "/v2/models/colours/infer", data=b"{", headers=auth(), timeout=10
    )
    assert not_json.status_code == 422 and "error" in not_json.json()
    no_key = requests.post(service.url + "/v2/models/colours/infer", data=b"{}", timeout=10)
    assert no_key.status_code == 401 and set(no_key.json()) == {"error"}
    with pytest.raises(InferenceServerException, match="nobody"):
        client.infer("nobody", [image_input([jpeg], True)], headers=auth())
    # still serving
    assert client.is_server_live() and client.is_server_ready()
    result = client.infer("colours", [image_input([jpeg], True)], headers=auth())
    assert result.as_numpy("class_ids").shape == (1, min(5, len(COLOURS)))


def test_v2_is_in_the_docs_and_the_metrics(service, client):
    paths = get_json(service.url + "/openapi.json")["paths"]
    assert {"/v2", "/v2/health/live", "/v2/models/{name}/infer"} <= set(paths)
    client.infer("colours", [image_input([photo("blue")[0]], True)], headers=auth())
    pattern = re.compile(r'convnext_serve_requests_total\{[^}]*endpoint="v2_infer"[^}]*\}')
    deadline = time.monotonic() + 60
    while not pattern.search(service.metrics()) and time.monotonic() < deadline:
        time.sleep(1)
    assert pattern.search(service.metrics())


def test_grpc_with_tritonclient(service):
    """The same models over gRPC (`GRPCInferenceService`), answers equal to /v1."""
    client = triton_grpc.InferenceServerClient(service.grpc_url)
    key = [("x-api-key", AUTH["X-API-Key"])]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("colours", headers=dict(key))  # a model route: the key, as HTTP
    meta = client.get_model_metadata("boxes", headers=dict(key), as_json=True)
    assert meta["name"] == "boxes" and {t["name"] for t in meta["inputs"]} == {"image", "pixels"}
    images = [photo(c, box=BIG)[0] for c in ("red", "green", "blue")]
    v1 = service.post("/v1/classify", images, params={"top_k": 2}).json()["results"]
    tensor = triton_grpc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    result = client.infer("colours", [tensor], parameters={"top_k": 2}, headers=dict(key))
    assert result.as_numpy("class_ids").tolist() == [
        [p["class_id"] for p in r["predictions"]] for r in v1
    ]
    with pytest.raises(InferenceServerException, match="unauthorized|API key"):
        client.infer("colours", [tensor])  # no key
    wrong = triton_grpc.InferInput("image", [len(images)], "FP32")
    wrong.set_data_from_numpy(np.zeros(len(images), np.float32))
    with pytest.raises(InferenceServerException, match="BYTES"):
        client.infer("colours", [wrong], headers=dict(key))
    with pytest.raises(InferenceServerException, match="nobody"):
        client.infer("nobody", [tensor], headers=dict(key))
    assert client.is_server_live()


def test_grpc_answers_every_task_as_http_does(service, client):
    """Server metadata, pixels in, detect and segment over gRPC: the same tensors as the REST
    protocol gives for the same inputs; an output the model does not have is refused."""
    grpc = triton_grpc.InferenceServerClient(service.grpc_url)
    key = {"x-api-key": AUTH["X-API-Key"]}
    server = grpc.get_server_metadata(as_json=True)
    assert server["name"] == "convnext-serve" and "binary_tensor_data" in server["extensions"]
    images = [photo(c, box=BIG)[0] for c in ("green", "blue")]

    def over_grpc(model: str, name: str, datatype: str, data: np.ndarray, **kw):
        tensor = triton_grpc.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        return grpc.infer(model, [tensor], headers=key, **kw)

    encoded = np.array(images, dtype=object)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(i)).convert("RGB")) for i in images])
    http = client.infer("colours", [pixels_input(images, True)], headers=auth())
    by_grpc = over_grpc("colours", "pixels", "UINT8", pixels)
    assert by_grpc.as_numpy("class_ids").tolist() == http.as_numpy("class_ids").tolist()

    params = {"score_threshold": 0.3, "max_detections": 5}
    http = client.infer("boxes", [image_input(images[:1], True)], parameters=params, headers=auth())
    by_grpc = over_grpc("boxes", "image", "BYTES", encoded[:1], parameters=params)
    assert int(by_grpc.as_numpy("num_detections")[0]) == int(http.as_numpy("num_detections")[0])
    assert by_grpc.as_numpy("class_ids").tolist() == http.as_numpy("class_ids").tolist()
    np.testing.assert_allclose(by_grpc.as_numpy("boxes"), http.as_numpy("boxes"), atol=1e-3)

    http = client.infer("regions", [image_input(images, True)], headers=auth())
    by_grpc = over_grpc("regions", "image", "BYTES", encoded)
    assert np.array_equal(by_grpc.as_numpy("class_map"), http.as_numpy("class_map"))

    with pytest.raises(InferenceServerException, match="nonsense"):
        over_grpc(
            "colours",
            "image",
            "BYTES",
            encoded,
            outputs=[triton_grpc.InferRequestedOutput("nonsense")],
        )
    assert grpc.is_server_live()


def test_a_pipeline_is_a_model_of_the_protocol_over_rest_and_grpc(service, client):
    """`colours-in-boxes` with tritonclient, as any model: metadata that says it is a
    pipeline, ready, and tensors holding what `/v1/pipelines` answers (the detector's boxes,
    each box's crop and classes), over REST (JSON and binary) and gRPC; only version 1."""
    name = "colours-in-boxes"
    before = request_counts(service, ("endpoint", "version", "status"), model=name)
    images = [two_objects(), photo("blue", box=BIG)[0]]
    v1 = service.post(f"/v1/pipelines/{name}", images).json()["results"]
    assert sum(len(r["detections"]) for r in v1) >= 2, v1
    meta = client.get_model_metadata(name, headers=auth())
    assert (meta["platform"], meta["versions"]) == ("convnext-serve_pipeline", ["1"])
    assert meta["parameters"]["detector"] == "boxes"
    assert [(s["model"], s["task"]) for s in meta["parameters"]["steps"]] == [
        ("colours", "classify")
    ]
    assert {t["name"] for t in meta["inputs"]} == {"image", "pixels"}
    names = [t["name"] for t in meta["outputs"]]
    assert {"boxes", "labels", "crop_boxes", "box_labels", "box_scores", "box_errors"} <= set(names)
    assert "box_class_maps" not in names  # no segment step
    assert client.is_model_ready(name, headers=auth())

    grpc = triton_grpc.InferenceServerClient(service.grpc_url)
    key = {"x-api-key": AUTH["X-API-Key"]}
    assert grpc.get_model_metadata(name, headers=key).platform == "convnext-serve_pipeline"
    assert grpc.is_model_ready(name, headers=key)
    tensor = triton_grpc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    answers = {
        "json": client.infer(name, [image_input(images, False)], headers=auth()),
        "binary": client.infer(
            name, [image_input(images, True)], outputs=outputs(names, True), headers=auth()
        ),
        "grpc": grpc.infer(name, [tensor], headers=key),
        # pixels the client decoded: the PNG's exact pixels, the same answer
        "pixels": client.infer(name, [pixels_input(images[:1], True)], headers=auth()),
    }
    for how, result in answers.items():
        got = {n: result.as_numpy(n) for n in names}
        answered = v1[: len(got["num_detections"])]
        assert got["num_detections"].tolist() == [len(r["detections"]) for r in answered], how
        for i, r in enumerate(answered):
            for j, d in enumerate(r["detections"]):
                np.testing.assert_allclose(got["boxes"][i, j], d["box"], atol=0.01)
                assert _text(got["labels"][i, j]) == d["label"], how
                assert got["crop_boxes"][i, j].tolist() == d["crop"], how
                assert _text(got["box_models"][i, j]) == "colours", how
                predictions = d["classify"]["predictions"]
                k = len(predictions)
                assert [_text(x) for x in got["box_labels"][i, j, :k]] == [
                    p["label"] for p in predictions
                ], how
                assert got["box_class_ids"][i, j, :k].tolist() == [
                    p["class_id"] for p in predictions
                ]
                np.testing.assert_allclose(
                    got["box_scores"][i, j, :k], [p["score"] for p in predictions], atol=1e-5
                )
                assert (got["box_class_ids"][i, j, k:] == -1).all()
            assert (got["class_ids"][i, len(r["detections"]) :] == -1).all(), how
    # a pipeline has version 1 only, and is counted under its name
    r = requests.get(f"{service.url}/v2/models/{name}/versions/2", headers=auth(), timeout=10)
    assert r.status_code == 404 and "no version '2'" in r.json()["error"], r.text
    with pytest.raises(InferenceServerException, match="no version '2'"):
        grpc.infer(name, [tensor], model_version="2", headers=key)
    assert not grpc.is_model_ready(name, "2", headers=key)
    by = ("endpoint", "version", "status")
    counted = counted_since(service, before, {("v2_infer", "1", "200"): 3}, by, model=name)
    assert counted == {("v2_infer", "1", "200"): 3}


def test_a_segment_step_answers_its_labels_boxes_with_the_crops_class_map(service, client):
    """A box goes to the first step that takes its label: the blue disc's box to the
    segmenter, whose map of the crop is what /v1/segment answers for the client's own crop of
    it, placed by `crop`; the red square's to the classifier. The protocol carries the map as
    the box's PNG."""
    name = "blue-segmented"
    data = two_objects()
    r = service.post(f"/v1/pipelines/{name}", [data])
    assert r.status_code == 200, r.text
    detections = r.json()["results"][0]["detections"]
    by_label = {d["label"]: d for d in detections}
    assert len(detections) == 2 and set(by_label) == {"red", "blue"}, detections
    blue, red = by_label["blue"], by_label["red"]
    assert "classify" not in blue and blue["segment"]["model"] == "regions"
    assert "segment" not in red and red["classify"]["predictions"][0]["label"] == "red"
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    crop, rect = client_crop(pixels, blue["box"], margin=0.1)
    assert blue["crop"] == rect
    piped = np.asarray(Image.open(io.BytesIO(base64.b64decode(blue["segment"]["mask"]["data"]))))
    alone = service.post("/v1/segment", [crop], params={"model": "regions"}).json()["results"][0]
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(alone["mask"]["data"]))))
    assert piped.shape == (rect[3] - rect[1], rect[2] - rect[0])
    assert (piped == expected).all()
    assert "blue" in {c["label"] for c in blue["segment"]["classes"]}

    result = client.infer(name, [image_input([data], True)], headers=auth())
    j = [d["label"] for d in detections].index("blue")
    maps = result.as_numpy("box_class_maps")
    png = np.asarray(Image.open(io.BytesIO(maps[0, j])))
    assert (png == piped).all()
    assert _text(result.as_numpy("box_models")[0, j]) == "regions"
    assert (result.as_numpy("box_class_ids")[0, j] == -1).all()  # no classes for this box
    assert _text(maps[0, 1 - j]) == ""  # the classified box has no map


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _endpoints_counted(service) -> set[str]:
    text = service.metrics()
    return set(re.findall(r'convnext_serve_requests_total\{[^}]*endpoint="([^"]+)"', text))


def test_every_route_of_the_table_is_answered_by_each_protocol(service):
    """Each path of the HTTP app answers (no 404 or 405: the table and the app agree), and each
    RPC of the route table's gRPC entries answers over gRPC (the model repository's with 403:
    this service sets no admin keys); the API ones of both are counted in
    `convnext_serve_requests_total` under their endpoint."""
    from service.repository_api import router as repository_router
    from service.route_table import GRPC, route_of
    from service.routes import router
    from service.v2 import router as v2_router

    routers = [*router.routes, *v2_router.routes, *repository_router.routes]
    for route in routers:
        path = route.path.replace("/pipelines/{name}", "/pipelines/colours-in-boxes")
        path = path.replace("{name}", "colours").replace("{version}", "1")
        for method in route.methods:
            r = requests.request(method, service.url + path, headers=AUTH, timeout=60)
            assert r.status_code not in (404, 405), (method, path, r.status_code, r.text[:200])
    grpc = triton_grpc.InferenceServerClient(service.grpc_url)
    key = {"x-api-key": AUTH["X-API-Key"]}
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photo("red", box=BIG)[0]], dtype=object))
    calls = {
        "ServerLive": lambda: grpc.is_server_live(headers=key),
        "ServerReady": lambda: grpc.is_server_ready(headers=key),
        "ModelReady": lambda: grpc.is_model_ready("colours", headers=key),
        "ServerMetadata": lambda: grpc.get_server_metadata(headers=key),
        "ModelMetadata": lambda: grpc.get_model_metadata("colours", headers=key),
        "ModelInfer": lambda: grpc.infer("colours", [tensor], headers=key),
    }
    repository = {
        "RepositoryIndex": lambda: grpc.get_model_repository_index(headers=key),
        "RepositoryModelLoad": lambda: grpc.load_model("colours", headers=key),
        "RepositoryModelUnload": lambda: grpc.unload_model("colours", headers=key),
    }
    assert {*calls, *repository} == set(GRPC)
    for method, call in calls.items():
        assert call(), method
    for method, call in repository.items():
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED", method
        assert "repository API is off" in refused.value.message()
    api_http = {
        route_of(r.path.replace("{name}", "colours")).endpoint
        for r in routers
        if route_of(r.path.replace("{name}", "colours")).api
    }
    wanted = api_http | {route.endpoint for route in GRPC.values() if route.api}
    deadline = time.monotonic() + 60  # reported every second, exported every few
    while not wanted <= _endpoints_counted(service) and time.monotonic() < deadline:
        time.sleep(1)
    assert wanted <= _endpoints_counted(service), wanted - _endpoints_counted(service)


SHADES = {"by": ("endpoint", "version"), "model": "shades"}


def test_each_protocol_reaches_a_version_and_every_answer_names_it(service, client):
    """Unnamed, "shades" answers with version 1 (version 2 has weight 0); named, version 2
    answers (its labels in capitals), and says so in `X-Model-Version`, in `/v1`'s JSON and in
    the protocol's `model_version`, over REST and gRPC; each counted under its version."""
    before = request_counts(service, **SHADES)
    image = photo("red", box=BIG)[0]
    for version, label in ((None, "red"), ("2", "RED"), ("1", "red")):
        params = {"model": "shades", **({"version": version} if version else {})}
        r = service.post("/v1/classify", [image], params=params)
        assert r.status_code == 200, r.text
        answered = version or "1"
        assert r.headers["x-model-version"] == answered and r.json()["version"] == answered
        assert r.json()["results"][0]["predictions"][0]["label"] == label
    meta = client.get_model_metadata("shades", headers=auth())
    assert meta["versions"] == ["1", "2"]
    assert client.is_model_ready("shades", "2", headers=auth())
    rest = client.infer("shades", [image_input([image], True)], model_version="2", headers=auth())
    assert rest.get_response()["model_version"] == "2"
    assert rest.as_numpy("labels")[0][0] == b"RED"
    grpc_client = triton_grpc.InferenceServerClient(service.grpc_url)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=object))
    key = {"x-api-key": AUTH["X-API-Key"]}  # gRPC metadata keys are lower case
    answer = grpc_client.infer("shades", [tensor], model_version="2", headers=key)
    assert answer.get_response().model_version == "2"
    assert answer.as_numpy("labels")[0][0] == b"RED"
    unnamed = grpc_client.infer("shades", [tensor], headers=key)
    assert unnamed.get_response().model_version == "1"
    r = requests.get(service.url + "/v2/models/shades/versions/3", headers=auth(), timeout=10)
    assert r.status_code == 404 and "has no version '3'" in r.json()["error"]
    wanted = {
        ("classify", "1"): 2,
        ("classify", "2"): 1,
        ("v2_infer", "2"): 1,
        ("grpc_infer", "2"): 1,
        ("grpc_infer", "1"): 1,
    }
    assert counted_since(service, before, wanted, **SHADES) == wanted
