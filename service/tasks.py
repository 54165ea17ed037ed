"""One adapter per task: its per-image options, its batch call, and its JSON answer.

The runtime and the routes know tasks only through these: `predict` takes a batch of preprocessed
uint8 images (on the model's device) with each image's options and original size, and
`result` turns one image's output into its entry of the response's `results`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from models.checkpoint import CheckpointMeta
from models.classification import normalize
from models.detection import Detections, detect
from models.segmentation import segment

from . import render as draw
from .errors import InvalidParameter

TOP_K_MAX = 1000  # classes a request may ask for per image


@dataclass(frozen=True)
class ClassifyOptions:
    top_k: int = 5


@dataclass(frozen=True)
class DetectOptions:
    score_threshold: float = 0.5
    max_detections: int = 100
    masks: bool = True


@dataclass(frozen=True)
class SegmentOptions:
    pass


class Task:
    name: ClassVar[str]
    options: ClassVar[type]

    def predict(
        self,
        runner: Any,
        images: list[torch.Tensor],
        sizes: list[tuple[int, int]],
        options: list[Any],
    ) -> list[Any]:
        """Outputs for a batch, in order; `sizes` are the original (H, W) to answer in."""
        raise NotImplementedError

    def result(self, meta: CheckpointMeta, output: Any) -> dict:
        raise NotImplementedError

    # The Open Inference Protocol (`service/protocol.py`, `service/v2.py`): the per-request
    # options as request `parameters`, and the outputs as named tensors.

    def options_from(self, parameters: dict[str, Any]) -> Any:
        """This task's options from a protocol request's `parameters` (the /v1 query's)."""
        return self.options()

    def tensor_outputs(self, meta: CheckpointMeta) -> list[tuple[str, str, list[int]]]:
        """(name, datatype, shape) of each output tensor; -1: any size."""
        raise NotImplementedError

    def tensors(self, meta: CheckpointMeta, outputs: list[Any], options: Any) -> dict[str, Any]:
        """{output name: numpy array, or nested lists of bytes for BYTES} for a request."""
        raise NotImplementedError


class Classify(Task):
    name, options = "classify", ClassifyOptions

    def predict(self, runner, images, sizes, options) -> list[list[tuple[int, float]]]:
        batch = torch.stack(images)
        bucket = next((b for b in runner.buckets if b >= len(images)), len(images))
        if bucket > len(images):  # zero images up to a warmed-up batch size
            batch = torch.cat([batch, batch.new_zeros((bucket - len(images), *batch.shape[1:]))])
        x = normalize(batch, runner.meta.mean, runner.meta.std, runner.device)
        probs = runner.model(x)[: len(images)].float().softmax(dim=-1)
        k = min(max(o.top_k for o in options), probs.shape[1])
        scores, ids = probs.topk(k, dim=-1)
        scores, ids = scores.cpu().tolist(), ids.cpu().tolist()
        return [
            list(zip(ids[i][: o.top_k], scores[i][: o.top_k], strict=True))
            for i, o in enumerate(options)
        ]

    def options_from(self, parameters) -> ClassifyOptions:
        return ClassifyOptions(_parameter(parameters, "top_k", int, 5, 1, TOP_K_MAX))

    def tensor_outputs(self, meta) -> list[tuple[str, str, list[int]]]:
        return [
            ("scores", "FP32", [-1, -1]),
            ("class_ids", "INT32", [-1, -1]),
            ("labels", "BYTES", [-1, -1]),
        ]

    def tensors(self, meta, outputs, options) -> dict[str, Any]:
        ids = np.array([[c for c, _ in out] for out in outputs], np.int32)
        return {
            "scores": np.array([[s for _, s in out] for out in outputs], np.float32),
            "class_ids": ids,
            "labels": [[meta.labels[c].encode() for c in row] for row in ids.tolist()],
        }

    def result(self, meta, output) -> dict:
        return {
            "predictions": [
                {"label": meta.labels[c], "class_id": c, "score": round(s, 6)} for c, s in output
            ]
        }


class Detect(Task):
    name, options = "detect", DetectOptions

    def predict(self, runner, images, sizes, options) -> list[Detections]:
        return detect(
            runner.model,
            images,
            score_threshold=[o.score_threshold for o in options],
            max_detections=[o.max_detections for o in options],
            masks=[o.masks for o in options],
            output_sizes=sizes,
        )

    def options_from(self, parameters) -> DetectOptions:
        return DetectOptions(
            _parameter(parameters, "score_threshold", float, 0.5, 0.0, 1.0),
            _parameter(parameters, "max_detections", int, 100, 1, 1000),
            _parameter(parameters, "masks", bool, True),
        )

    def tensor_outputs(self, meta) -> list[tuple[str, str, list[int]]]:
        return [
            ("boxes", "FP32", [-1, -1, 4]),
            ("scores", "FP32", [-1, -1]),
            ("class_ids", "INT32", [-1, -1]),
            ("num_detections", "INT32", [-1]),
            ("masks", "BYTES", [-1, -1]),
        ]

    def tensors(self, meta, outputs: list[Detections], options: DetectOptions) -> dict[str, Any]:
        """Padded to the request's `max_detections`; `num_detections` says how many are real.
        Masks (with `masks`) are COCO RLE strings at the image's size, empty for padding."""
        n, m = len(outputs), options.max_detections
        boxes, scores = np.zeros((n, m, 4), np.float32), np.zeros((n, m), np.float32)
        class_ids, counts = np.full((n, m), -1, np.int32), np.zeros(n, np.int32)
        masks = [[b""] * m for _ in range(n)]
        for i, out in enumerate(outputs):
            k = counts[i] = len(out.scores)
            boxes[i, :k], scores[i, :k], class_ids[i, :k] = out.boxes, out.scores, out.class_ids
            for j, rle in enumerate(out.masks or []):
                masks[i][j] = rle["counts"].encode()
        tensors = {
            "boxes": boxes,
            "scores": scores,
            "class_ids": class_ids,
            "num_detections": counts,
        }
        if options.masks:
            tensors["masks"] = masks
        return tensors

    def result(self, meta, output: Detections) -> dict:
        detections = []
        for i in range(len(output.scores)):
            entry = {
                "label": meta.labels[int(output.class_ids[i])],
                "class_id": int(output.class_ids[i]),
                "score": round(float(output.scores[i]), 6),
                "box": [round(float(v), 2) for v in output.boxes[i]],
            }
            if output.masks is not None:  # asked for, or needed to render
                entry["mask"] = output.masks[i]
            detections.append(entry)
        return {"width": output.width, "height": output.height, "detections": detections}


class Segment(Task):
    name, options = "segment", SegmentOptions

    def predict(self, runner, images, sizes, options) -> list[np.ndarray]:
        maps = segment(
            runner.model,
            images,
            image_size=runner.meta.image_size,
            output_sizes=sizes,
            mode="slide" if runner.config.sliding_window else "whole",
        )
        dtype = np.uint8 if runner.meta.num_classes <= 256 else np.uint16
        return [m.cpu().numpy().astype(dtype) for m in maps]

    def tensor_outputs(self, meta) -> list[tuple[str, str, list[int]]]:
        return [("class_map", "UINT8" if meta.num_classes <= 256 else "UINT16", [-1, -1, -1])]

    def tensors(self, meta, outputs: list[np.ndarray], options) -> dict[str, Any]:
        sizes = {out.shape for out in outputs}
        if len(sizes) > 1:
            raise InvalidParameter(
                f"class maps of one request are one tensor: its images must share a size, "
                f"not {sorted(sizes)} (send them in separate requests)"
            )
        return {"class_map": np.stack(outputs)}

    def result(self, meta, output: np.ndarray) -> dict:
        counts = np.bincount(output.ravel(), minlength=meta.num_classes)
        total = max(1, output.size)
        classes = [
            {
                "class_id": int(c),
                "label": meta.labels[c],
                "pixel_fraction": round(counts[c] / total, 6),
            }
            for c in np.flatnonzero(counts)
        ]
        png = base64.b64encode(draw.class_map_png(output)).decode()
        return {
            "width": int(output.shape[1]),
            "height": int(output.shape[0]),
            "classes": classes,
            "mask": {"format": "png", "data": png},
        }


def _parameter(
    parameters: dict[str, Any],
    name: str,
    kind: type,
    default: Any,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """A request parameter of a type (an int passes as a float, nothing else converts)."""
    value = parameters.get(name, default)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise InvalidParameter(f"parameter {name!r} is a {kind.__name__}, not {value!r}")
    if low is not None and not low <= value <= high:
        raise InvalidParameter(f"parameter {name!r} is {low:g}..{high:g}, not {value!r}")
    return value


ADAPTERS: dict[str, Task] = {t.name: t for t in (Classify(), Detect(), Segment())}
