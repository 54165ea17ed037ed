"""The Open Inference Protocol's bodies (`service.protocol`), in-process, against NVIDIA's own
client as the reference: requests that `tritonclient` encodes parse to the tensors it was given,
answers parse back in `tritonclient` to the model's outputs, and every inconsistent body is
the client's error (422 `invalid_parameter`, or 413 for too many pixels)."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import serialize_byte_tensor

from models.checkpoint import CheckpointMeta, Provenance
from service.config import ServerConfig
from service.errors import ImageTooLarge, InvalidParameter
from service.protocol import (
    InferenceRequest,
    RequestInput,
    model_input,
    model_metadata,
    parse_request,
    response_body,
    tensor_images,
)
from service.tasks import ADAPTERS

LIMITS = ServerConfig(max_pixels=10_000, max_images_per_request=4)
IMAGES = [b"\x89PNG first", b"", b"\xff\xd8 third \x00 with a nul"]


def encoded(inputs, outputs=None, parameters=None) -> tuple[bytes, str | None]:
    body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs, outputs, parameters=parameters
    )
    return body, None if json_size is None else str(json_size)


def bytes_input(images, binary: bool, name: str = "image") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False])
def test_encoded_images_from_tritonclient(binary):
    """Binary: the images' own bytes; JSON: base64 strings (JSON has no bytes)."""
    sent = IMAGES if binary else [base64.b64encode(i).decode() for i in IMAGES]
    request, data = parse_request(*encoded([bytes_input(sent, binary)]))
    tensor = model_input(request.inputs, "m")
    assert tensor_images(tensor, data.get("image"), LIMITS) == IMAGES


@pytest.mark.parametrize("binary", [True, False])
def test_pixels_from_tritonclient(binary):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    request, data = parse_request(*encoded([tensor]))
    images = tensor_images(model_input(request.inputs, "m"), data.get("pixels"), LIMITS)
    assert len(images) == 2 and all(i.dtype == np.uint8 for i in images)
    assert np.array_equal(np.stack(images), pixels)


def test_two_binary_inputs_split_where_their_sizes_say():
    first, second = bytes_input(IMAGES[:1], True), bytes_input(IMAGES[1:], True, "other")
    _, data = parse_request(*encoded([first, second]))
    assert data == {
        "image": serialize_byte_tensor(np.array(IMAGES[:1], dtype=object)).item(),
        "other": serialize_byte_tensor(np.array(IMAGES[1:], dtype=object)).item(),
    }


def _input(**kw) -> RequestInput:
    return RequestInput.model_validate({"name": "image", "datatype": "BYTES", "shape": [1], **kw})


def _sized(size) -> bytes:
    """A request header whose one input says it has `size` bytes of binary data."""
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "parameters": {"binary_data_size": size},
    }
    return json.dumps({"inputs": [tensor]}).encode()


def _header_of(size) -> str:
    return str(len(_sized(size)))


def _two(first: int, second: int, data: bytes) -> tuple[bytes, str]:
    """A body whose two inputs say they have `first` and `second` bytes, followed by `data`."""
    inputs = [
        {"name": n, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}
        for n, size in (("first", first), ("second", second))
    ]
    header = json.dumps({"inputs": inputs}).encode()
    return header + data, str(len(header))


def test_the_parse_error_is_its_first_line():
    """pydantic's message runs over several lines; the answer quotes the first."""
    with pytest.raises(InvalidParameter) as refused:
        parse_request(b'{"inputs": "no list"}', None)
    assert (
        refused.value.message == "not an inference request: 1 validation error for InferenceRequest"
    )


def test_json_and_binary_inputs_mix_and_binary_data_may_be_empty():
    inputs = [
        {"name": "json", "datatype": "BYTES", "shape": [1], "data": ["aGk="]},
        {"name": "empty", "datatype": "BYTES", "shape": [0], "parameters": {"binary_data_size": 0}},
        {
            "name": "binary",
            "datatype": "BYTES",
            "shape": [1],
            "parameters": {"binary_data_size": 3},
        },
    ]
    header = json.dumps({"inputs": inputs}).encode()
    request, data = parse_request(header + b"abc", str(len(header)))
    assert [i.name for i in request.inputs] == ["json", "empty", "binary"]
    assert data == {"empty": b"", "binary": b"abc"}


@pytest.mark.parametrize(
    "body, header_length, problem",
    [
        (b'{"inputs": []}', "x", "^Inference-Header-Content-Length is not a number$"),
        (b'{"inputs": []}', "0", "^not an inference request: Expecting value"),
        (b'{"inputs": []}', "99", "beyond the body's 14 bytes"),
        (b'{"inputs": []}', "-1", "beyond the body's"),
        (b"{not json", None, "^not an inference request: Expecting property name enclosed"),
        (b'{"inputs": "no list"}', None, "not an inference request"),
        (b"[" * 100_000, None, "not an inference request"),  # nested past the recursion limit
        (_sized(10) + b"abc", _header_of(10), "binary_data_size 10 is beyond the 3 bytes left"),
        (_sized(-1), _header_of(-1), "binary_data_size -1"),
        (_sized("3") + b"abc", _header_of("3"), "binary_data_size 3"),
        (b'{"inputs": []}abc', "14", "3 bytes of binary data belong to no input"),
        (*_two(5, 2, b"abcdef"), "input 'second': binary_data_size 2 is beyond the 1 bytes left"),
        (*_two(2, 2, b"abcdef"), "^2 bytes of binary data belong to no input$"),
    ],
)
def test_inconsistent_bodies_are_the_clients_error(body, header_length, problem):
    with pytest.raises(InvalidParameter, match=problem):
        parse_request(body, header_length)


def test_the_input_must_be_one_and_named_and_typed_as_the_models():
    assert model_input([_input()], "m").name == "image"
    with pytest.raises(InvalidParameter, match="takes one input.*not 2"):
        model_input([_input(), _input()], "m")
    with pytest.raises(InvalidParameter, match="takes one input.*not 0"):
        model_input([], "m")
    with pytest.raises(InvalidParameter, match="unexpected inference input 'photo'"):
        model_input([_input(name="photo")], "m")
    with pytest.raises(InvalidParameter, match="'pixels' is UINT8, not BYTES"):
        model_input([_input(name="pixels")], "m")


def _bytes(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@pytest.mark.parametrize(
    "tensor, data, error, problem",
    [
        (dict(shape=[-1]), _bytes(b"a"), InvalidParameter, "not a tensor's shape"),
        (dict(shape=[1, 1]), _bytes(b"a"), InvalidParameter, "has shape \\[N\\]"),
        (dict(shape=[2]), _bytes(b"a"), InvalidParameter, "says 2 images, the data holds 1"),
        (dict(shape=[0]), b"", InvalidParameter, "holds no image"),
        (dict(shape=[5]), _bytes(*[b"a"] * 5), InvalidParameter, "5 images; at most 4"),
        (dict(shape=[1]), _bytes(b"abc")[:-1], InvalidParameter, "cut short"),
        (dict(shape=[1]), b"\x01\x00", InvalidParameter, "cut short"),
        (dict(shape=[1], data=["not base64!"]), None, InvalidParameter, "base64 strings"),
        (dict(shape=[1], data=["aGk=*"]), None, InvalidParameter, "base64 strings"),
        (dict(shape=[1]), b"\xff\xff\xff\xffabc", InvalidParameter, "cut short"),
        (dict(shape=[1], data=[3]), None, InvalidParameter, "base64 strings"),
        (dict(shape=[1]), None, InvalidParameter, "input 'image' has neither data nor binary_data"),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3]),
            None,
            InvalidParameter,
            "input 'pixels' has neither data nor binary_data",
        ),
        (dict(datatype="FP32", shape=[1]), b"1234", InvalidParameter, "not BYTES .* or UINT8"),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 2, 2, 4]),
            bytes(16),
            InvalidParameter,
            "\\[N, H, W, 3\\]",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 0, 2, 3]),
            b"",
            InvalidParameter,
            "at least 1",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 2, 0, 3]),
            b"",
            InvalidParameter,
            "at least 1",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 2, 2]),
            bytes(12),
            InvalidParameter,
            "\\[N, H, W, 3\\]",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 101, 100, 3]),
            bytes(30300),
            ImageTooLarge,
            "100x101 pixels is over the limit of 10000",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 2, 2, 3]),
            bytes(11),
            InvalidParameter,
            "needs 12 elements, the binary data holds 11",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3], data=[1, 2]),
            None,
            InvalidParameter,
            "needs 3 elements, the data holds 2",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3], data=[1, 2, 256]),
            None,
            InvalidParameter,
            "0..255",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3], data=[-1, 2, 3]),
            None,
            InvalidParameter,
            "0..255",
        ),
        (
            dict(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3], data=["a", 2, 3]),
            None,
            InvalidParameter,
            "are integers",
        ),
    ],
)
def test_images_of_refuses_what_does_not_add_up(tensor, data, error, problem):
    with pytest.raises(error, match=problem):
        tensor_images(_input(**tensor), data, LIMITS)


def test_json_data_nested_as_the_shape_is_read_flat():
    pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    nested = _input(name="pixels", datatype="UINT8", shape=[1, 2, 2, 3], data=pixels.tolist())
    assert np.array_equal(tensor_images(nested, None, LIMITS)[0], pixels[0])
    b64 = _input(shape=[2], data=[[base64.b64encode(b"x").decode()], [""]])
    assert tensor_images(b64, None, LIMITS) == [b"x", b""]


def test_at_the_limits_is_allowed():
    four = _input(shape=[4])
    assert len(tensor_images(four, _bytes(*[b"a"] * 4), LIMITS)) == 4
    edge = _input(name="pixels", datatype="UINT8", shape=[1, 100, 100, 3])
    assert tensor_images(edge, bytes(30000), LIMITS)[0].shape == (100, 100, 3)
    white = _input(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3], data=[0, 128, 255])
    assert tensor_images(white, None, LIMITS)[0].tolist() == [[[0, 128, 255]]]
    last_empty = _input(shape=[2])
    assert tensor_images(last_empty, _bytes(b"a", b""), LIMITS) == [b"a", b""]


# --------------------------------------------------------------------------- answers

TENSORS = {
    "class_ids": np.array([[2, 0], [1, 2]], dtype=np.int64),
    "scores": np.array([[0.75, 0.25], [0.5, 0.125]], dtype=np.float32),
    "labels": [[b"star", b"circle"], [b"square", b"star"]],
}
DATATYPES = {"class_ids": "INT64", "scores": "FP32", "labels": "BYTES"}


def _request(outputs=None, **parameters) -> InferenceRequest:
    return InferenceRequest.model_validate(
        {"id": "r1", "inputs": [], "outputs": outputs, "parameters": parameters or None}
    )


def _parsed(body: bytes, header_length: int | None):
    return triton.InferenceServerClient.parse_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_reads_every_output_back(binary):
    request = _request(binary_data_output=binary)
    body, header_length = response_body("m", "1", request, TENSORS, DATATYPES)
    assert (header_length is not None) == binary
    result = _parsed(body, header_length)
    header = result.get_response()
    assert header["id"] == "r1" and header["model_name"] == "m" and header["model_version"] == "1"
    assert "parameters" not in header  # nothing unset is written as null
    assert np.array_equal(result.as_numpy("class_ids"), TENSORS["class_ids"])
    assert np.array_equal(result.as_numpy("scores"), TENSORS["scores"])
    labels = [
        [v if isinstance(v, bytes) else v.encode() for v in row]
        for row in result.as_numpy("labels").tolist()
    ]  # JSON: strings
    assert labels == TENSORS["labels"]
    if not binary:
        outputs = json.loads(body)["outputs"]
        assert [o["data"] for o in outputs] == [
            [2, 0, 1, 2],
            [0.75, 0.25, 0.5, 0.125],
            ["star", "circle", "square", "star"],
        ]  # numbers as JSON numbers, strings as strings
        assert all(set(o) == {"name", "datatype", "shape", "data"} for o in outputs)


def test_only_the_outputs_asked_for_each_binary_or_not_as_asked():
    outputs = [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "labels"}]
    body, header_length = response_body("m", "1", _request(outputs), TENSORS, DATATYPES)
    header = json.loads(body[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["scores", "labels"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert "data" in header["outputs"][1]
    result = _parsed(body, header_length)
    assert np.array_equal(result.as_numpy("scores"), TENSORS["scores"])
    assert result.as_numpy("class_ids") is None


def test_an_output_the_model_does_not_have_is_refused():
    with pytest.raises(InvalidParameter, match="model 'm' has no output 'masks'"):
        response_body("m", "1", _request([{"name": "masks"}]), TENSORS, DATATYPES)


def test_binary_outputs_are_sent_in_their_declared_datatype_byte_for_byte():
    """A float64 array declared FP32 goes as 4 bytes a value; BYTES go byte for byte (a
    trailing NUL kept, which numpy's fixed-width strings would drop), text as UTF-8."""
    tensors = {
        "scores": np.array([[0.5, 0.25]], dtype=np.float64),
        "raw": [[b"\x00rle\x00", b""]],
        "names": [["étoile", "disc"]],
    }
    datatypes = {"scores": "FP32", "raw": "BYTES", "names": "BYTES"}
    body, header_length = response_body(
        "m", "1", _request(binary_data_output=True), tensors, datatypes
    )
    header = json.loads(body[:header_length])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [8, 13, 19]
    result = _parsed(body, header_length)
    assert result.as_numpy("scores").dtype == np.float32
    assert result.as_numpy("scores").tolist() == [[0.5, 0.25]]
    assert result.as_numpy("raw").tolist() == [[b"\x00rle\x00", b""]]
    assert result.as_numpy("names").tolist() == [["étoile".encode(), b"disc"]]


def test_model_metadata_describes_the_model_from_its_task_and_checkpoint():
    meta = CheckpointMeta(
        task="classify",
        arch="convnext_atto",
        head="linear",
        num_classes=2,
        labels=["disc", "square"],
        image_size=64,
        provenance=Provenance(source="trained"),
    )
    assert model_metadata("shapes", ["1", "2"], ADAPTERS["classify"], meta) == {
        "name": "shapes",
        "versions": ["1", "2"],
        "platform": "convnext-serve_classify",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "class_ids", "datatype": "INT32", "shape": [-1, -1]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        ],
        "parameters": {
            "task": "classify",
            "arch": "convnext_atto",
            "image_size": 64,
            "num_classes": 2,
        },
    }
