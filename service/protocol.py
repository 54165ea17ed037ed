"""The Open Inference Protocol (KServe v2, Triton's REST API): its messages and tensors.

Pydantic models of the protocol's JSON (kserve/open-inference-protocol,
`specification/protocol/inference_rest.md`), the binary tensor data extension (a JSON header of
`Inference-Header-Content-Length` bytes, then the tensors' raw bytes in order; a `BYTES`
element is a 4-byte little-endian length and its bytes), and the conversions between tensors
and what the service runs: encoded images or RGB pixels in, numpy arrays out.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from .config import ServerConfig
from .errors import ImageTooLarge, InvalidParameter

# The protocol's datatypes this service reads or writes, as numpy types (BYTES: Python bytes).
TENSOR_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
EXTENSIONS = ["binary_tensor_data"]
# Each served model is a protocol model of version "1" with two inputs, of which a request
# sends one: encoded images, or RGB pixels the client decoded.
SERVER_VERSION = "1"
INPUTS = {"image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, 3])}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ServerMetadata(BaseModel):
    name: str = Field(examples=["convnext-serve"])
    version: str = Field(examples=["1"])
    extensions: list[str] = Field(examples=[EXTENSIONS])


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(examples=[["1"]])
    platform: str = Field(examples=["pytorch_convnext_classify"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict)


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ProtocolError(BaseModel):
    error: str = Field(examples=["unexpected inference input 'pixels' for model 'classifier'"])


INFER_EXAMPLE = {
    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["<base64 JPEG>"]}],
    "parameters": {"top_k": 3},
}


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None

    model_config = {"json_schema_extra": {"examples": [INFER_EXAMPLE]}}


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


# ----------------------------------------------------------------------------- models


def metadata(
    name: str,
    versions: list[str],
    platform: str,
    outputs: list[tuple[str, str, list[int]]],
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """`ModelMetadata`'s fields of anything served as a protocol model: the service's two
    inputs, and its own (name, datatype, shape) outputs."""
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in INPUTS.items()],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
        "parameters": parameters,
    }


def model_metadata(name: str, versions: list[str], task: Any, meta: Any) -> dict[str, Any]:
    """A model's metadata from its versions, its task adapter and a version's checkpoint."""
    parameters = {
        "task": task.name,
        "arch": meta.arch,
        "image_size": meta.image_size,
        "num_classes": meta.num_classes,
    }
    outputs = task.tensor_outputs(meta)
    return metadata(name, versions, f"convnext-serve_{task.name}", outputs, parameters)


def model_input(inputs: list[RequestInput], model: str) -> RequestInput:
    """The request's one input, named and typed as the model's inputs say."""
    if len(inputs) != 1:
        raise InvalidParameter(
            f"model {model!r} takes one input, 'image' (BYTES) or 'pixels' (UINT8), not "
            f"{len(inputs)}"
        )
    tensor = inputs[0]
    if tensor.name not in INPUTS:
        raise InvalidParameter(
            f"unexpected inference input {tensor.name!r} for model {model!r}: 'image' (BYTES, "
            f"encoded images) or 'pixels' (UINT8, [N, H, W, 3])"
        )
    datatype = INPUTS[tensor.name][0]
    if tensor.datatype != datatype:
        raise InvalidParameter(f"input {tensor.name!r} is {datatype}, not {tensor.datatype}")
    return tensor


# --------------------------------------------------------------------------- requests


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict]:
    """The request and {input name: its binary data} from a body, JSON alone or JSON + tensors
    (the binary extension); anything inconsistent is the client's error."""
    if header_length is None:
        header, rest = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidParameter("Inference-Header-Content-Length is not a number") from None
        if not 0 <= length <= len(body):
            raise InvalidParameter(
                f"Inference-Header-Content-Length {length} is beyond the body's {len(body)} bytes"
            )
        header, rest = body[:length], body[length:]
    try:
        request = InferenceRequest.model_validate(json.loads(header))
    except (ValueError, ValidationError, RecursionError) as e:  # RecursionError: nested deep
        raise InvalidParameter(f"not an inference request: {_first_line(e)}") from None
    binary, offset = {}, 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise InvalidParameter(
                f"input {tensor.name!r}: binary_data_size {size} is beyond the "
                f"{len(rest) - offset} bytes left in the body"
            )
        binary[tensor.name] = rest[offset : offset + size]
        offset += size
    if offset != len(rest):
        raise InvalidParameter(f"{len(rest) - offset} bytes of binary data belong to no input")
    return request, binary


def tensor_images(tensor: RequestInput, data: bytes | None, limits: ServerConfig) -> list[Any]:
    """The images of an input: encoded bytes from a `BYTES [N]` tensor (JSON: base64
    strings), or HWC uint8 arrays from a `UINT8 [N, H, W, 3]` tensor, within the limits."""
    shape = tensor.shape
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidParameter(f"input {tensor.name!r}: shape {shape} is not a tensor's shape")
    if tensor.datatype == "BYTES":
        if len(shape) != 1:
            raise InvalidParameter(
                f"input {tensor.name!r}: a BYTES input of encoded images has shape [N], not {shape}"
            )
        images = _bytes_elements(tensor, data)
    elif tensor.datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3 or not (shape[1] and shape[2]):
            raise InvalidParameter(
                f"input {tensor.name!r}: UINT8 pixels have shape [N, H, W, 3], H and W at "
                f"least 1, not {shape}"
            )
        if shape[1] * shape[2] > limits.max_pixels:
            raise ImageTooLarge(
                f"{shape[2]}x{shape[1]} pixels is over the limit of {limits.max_pixels}"
            )
        images = list(_pixels(tensor, data))
    else:
        raise InvalidParameter(
            f"input {tensor.name!r}: datatype {tensor.datatype} is not BYTES (encoded images) "
            f"or UINT8 (RGB pixels)"
        )
    if len(images) != shape[0]:
        raise InvalidParameter(
            f"input {tensor.name!r}: shape {shape} says {shape[0]} images, the data holds "
            f"{len(images)}"
        )
    if not images:
        raise InvalidParameter(f"input {tensor.name!r} holds no image")
    if len(images) > limits.max_images_per_request:
        raise InvalidParameter(
            f"{len(images)} images; at most {limits.max_images_per_request} a request"
        )
    return images


def _bytes_elements(tensor: RequestInput, data: bytes | None) -> list[bytes]:
    if data is not None:
        elements, offset = [], 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise InvalidParameter(f"input {tensor.name!r}: a BYTES element is cut short")
            (size,) = struct.unpack_from("<I", data, offset)
            if offset + 4 + size > len(data):
                raise InvalidParameter(f"input {tensor.name!r}: a BYTES element is cut short")
            elements.append(data[offset + 4 : offset + 4 + size])
            offset += 4 + size
        return elements
    values = _flat(tensor.data, tensor.name)
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (TypeError, ValueError):
        raise InvalidParameter(
            f"input {tensor.name!r}: BYTES images in JSON are base64 strings"
        ) from None


def _pixels(tensor: RequestInput, data: bytes | None) -> np.ndarray:
    count = int(np.prod(tensor.shape))
    if data is not None:
        if len(data) != count:
            raise InvalidParameter(
                f"input {tensor.name!r}: shape {tensor.shape} needs {count} elements, the "
                f"binary data holds {len(data)}"
            )
        return np.frombuffer(data, np.uint8).reshape(tensor.shape)
    values = _flat(tensor.data, tensor.name)
    if len(values) != count:
        raise InvalidParameter(
            f"input {tensor.name!r}: shape {tensor.shape} needs {count} elements, the data "
            f"holds {len(values)}"
        )
    try:
        array = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError):
        raise InvalidParameter(f"input {tensor.name!r}: UINT8 data are integers") from None
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InvalidParameter(f"input {tensor.name!r}: UINT8 data are 0..255")
    return array.astype(np.uint8).reshape(tensor.shape)


def _flat(data: list[Any] | None, name: str) -> list[Any]:
    if data is None:
        raise InvalidParameter(f"input {name!r} has neither data nor binary_data_size")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _first_line(error: Exception) -> str:
    return str(error).partition("\n")[0]


# -------------------------------------------------------------------------- responses


def response_body(
    model: str,
    version: str,
    request: InferenceRequest,
    tensors: dict[str, Any],
    datatypes: dict[str, str],
) -> tuple[bytes, int | None]:
    """The response body to `request` from the model's output `tensors` (the outputs it asked
    for, else all; binary where asked), and the JSON header's length when any is binary."""
    wanted = request.outputs or []
    names = output_names(model, [o.name for o in wanted], tensors)
    all_binary = bool((request.parameters or {}).get("binary_data_output"))
    asked = {o.name: o.parameters or {} for o in wanted}
    binary = {n for n in names if asked.get(n, {}).get("binary_data", all_binary)}
    response = InferenceResponse(
        model_name=model,
        model_version=version,
        id=request.id,
        outputs=[
            ResponseOutput(name=n, datatype=datatypes[n], shape=tensor_shape(tensors[n]))
            for n in names
        ],
    )
    return _encode(response, tensors, binary)


def output_names(model: str, asked: list[str], tensors: dict[str, Any]) -> list[str]:
    """The outputs to answer: those asked for, each one the model has here, else all."""
    for name in asked:
        if name not in tensors:
            raise InvalidParameter(
                f"model {model!r} has no output {name!r} here; it has {list(tensors)}"
            )
    return list(asked) or list(tensors)


def tensor_shape(value: np.ndarray | list) -> list[int]:
    # object: the shape of nested lists of strings, without copying them into a fixed-width array
    return list(np.asarray(value, dtype=object if isinstance(value, list) else None).shape)


def _encode(
    response: InferenceResponse, tensors: dict[str, np.ndarray | list], binary: set[str]
) -> tuple[bytes, int | None]:
    chunks = []
    for output in response.outputs:
        value = tensors[output.name]
        if output.name in binary:
            raw = raw_tensor(value, output.datatype)
            output.parameters = {**(output.parameters or {}), "binary_data_size": len(raw)}
            chunks.append(raw)
        elif output.datatype == "BYTES":
            output.data = [v.decode() if isinstance(v, bytes) else v for v in _flat_bytes(value)]
        else:
            output.data = np.asarray(value).ravel().tolist()
    header = response.model_dump_json(exclude_none=True).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def raw_tensor(value: np.ndarray | list, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in _flat_bytes(value))
    return np.ascontiguousarray(value, dtype=TENSOR_DTYPES[datatype]).tobytes()


def _flat_bytes(value: np.ndarray | list) -> list[bytes]:
    return [
        v if isinstance(v, bytes) else str(v).encode()
        for v in np.asarray(value, dtype=object).ravel()
    ]
