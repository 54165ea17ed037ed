"""Pipelines: find the objects, then run a second model on each one, inside the replica.

The image is decoded once; the detector runs on its pixels, and each box it finds (with some
context around it) is cut from those same pixels, with no re-encode, and submitted to the
second model's own host, so the crops of every request batch together with that model's other
requests and go through its own preprocessing. What one request may send on is bounded (boxes
an image, crop pixels a request); a box that cannot be sent (empty, or beyond the bounds) is
answered with the reason on that box, not as a failed request.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from typing import Any

import numpy as np

from models.images import ImageError, decode_image

from .config import PipelineConfig, PipelineStep
from .data_plane import DataPlane
from .errors import image_error
from .host import ModelHost
from .metrics import pipeline_metrics
from .tasks import ClassifyOptions, DetectOptions, SegmentOptions

MAX_DETECTIONS = 100  # the detector's, as /v1/detect answers by default


def crop_rect(
    box: list[float], width: int, height: int, margin: float
) -> tuple[int, int, int, int] | None:
    """The pixels (left, top, right, bottom) of a box grown by `margin` of its size each side,
    within the image; None for a box with nothing inside it."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if not (w > 0 and h > 0):
        return None
    left = max(0, math.floor(x1 - margin * w))
    top = max(0, math.floor(y1 - margin * h))
    right = min(width, math.ceil(x2 + margin * w))
    bottom = min(height, math.ceil(y2 + margin * h))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right, bottom


def step_for(pipeline: PipelineConfig, label: str) -> PipelineStep | None:
    """The first step that takes boxes of this label."""
    return next((s for s in pipeline.steps if s.classes is None or label in s.classes), None)


def _decode(images: list[bytes | np.ndarray], max_pixels: int) -> list[np.ndarray]:
    """Each image's RGB pixels: encoded bytes decoded, pixels a client decoded (the
    protocol's `pixels` input, checked against the limits already) as they are."""
    pixels = []
    for i, data in enumerate(images):
        if isinstance(data, np.ndarray):
            pixels.append(data)
            continue
        try:
            pixels.append(decode_image(data, max_pixels).pixels)
        except ImageError as e:
            raise image_error(e, i, len(images)) from None
    return pixels


Job = tuple[dict, PipelineStep, np.ndarray]  # a box's detection, its step and its crop


def select_crops(
    pipeline: PipelineConfig, pixels: list[np.ndarray], results: list[dict]
) -> tuple[dict[str, list[Job]], dict[str, int]]:
    """The crops to send on, by second model, best boxes first, within the pipeline's bounds;
    a box held back gets its reason (`error`). Also how many boxes were sent, unmatched (no
    step takes the label) and held back."""
    budget = pipeline.max_crop_pixels
    outcomes = dict.fromkeys(("sent", "unmatched", "held_back"), 0)
    jobs: dict[str, list[Job]] = {}
    for image, result in zip(pixels, results, strict=True):
        height, width = image.shape[:2]
        sent = 0
        for detection in result["detections"]:  # best first
            step = step_for(pipeline, detection["label"])
            if step is None:
                outcomes["unmatched"] += 1
                continue
            rect = crop_rect(detection["box"], width, height, pipeline.margin)
            if sent >= pipeline.max_boxes:
                detection["error"] = (
                    f"not sent on: the pipeline takes {pipeline.max_boxes} boxes an image "
                    "(max_boxes)"
                )
            elif rect is None:
                detection["error"] = "not sent on: the box is empty"
            elif (rect[2] - rect[0]) * (rect[3] - rect[1]) > budget:
                detection["error"] = (
                    "not sent on: the request's crops would be over the pipeline's "
                    f"{pipeline.max_crop_pixels} pixels (max_crop_pixels)"
                )
            else:
                left, top, right, bottom = rect
                budget -= (right - left) * (bottom - top)
                sent += 1
                detection["crop"] = list(rect)
                crop = np.ascontiguousarray(image[top:bottom, left:right])
                jobs.setdefault(step.model, []).append((detection, step, crop))
            outcomes["held_back" if "error" in detection else "sent"] += 1
    return jobs, outcomes


async def run_pipeline(
    plane: DataPlane,
    pipeline: PipelineConfig,
    images: list[bytes | np.ndarray],
    client: str | None,
) -> dict[str, Any]:
    """The detector's answer for each image, each box with its second model's result (or
    the reason it has none)."""
    metrics = pipeline_metrics()
    tags = {"pipeline": pipeline.name}
    detector = plane.model("detect", pipeline.detector, None, client)
    started = time.perf_counter()
    pixels = await asyncio.to_thread(_decode, images, plane.config.max_pixels)
    decoded = time.perf_counter()
    metrics.stage.observe(decoded - started, tags={**tags, "stage": "decode"})
    options = DetectOptions(pipeline.score_threshold, MAX_DETECTIONS, masks=False)
    outputs = await plane.infer(detector, pixels, options)
    results = [detector.task.result(detector.meta, out) for out in outputs]
    detected = time.perf_counter()
    metrics.stage.observe(detected - decoded, tags={**tags, "stage": "detect"})

    jobs, outcomes = select_crops(pipeline, pixels, results)

    async def second(model: str, items: list[Job]) -> None:
        host = plane.model(None, model, None, client)
        crops = [crop for _, _, crop in items]
        if host.task.name == "classify":
            # one call a top_k: a model's steps may ask for different ones
            by_k: dict[int, list[int]] = {}
            for i, (_, step, _) in enumerate(items):
                by_k.setdefault(step.top_k, []).append(i)
            answers: list[Any] = [None] * len(items)
            for k, where in by_k.items():
                outs = await plane.infer(host, [crops[i] for i in where], ClassifyOptions(k))
                for i, out in zip(where, outs, strict=True):
                    answers[i] = out
        else:
            answers = await plane.infer(host, crops, SegmentOptions())
        for (detection, _, _), out in zip(items, answers, strict=True):
            detection[host.task.name] = _second_result(host, out)

    for outcome, n in outcomes.items():
        if n:
            metrics.boxes.inc(n, tags={**tags, "outcome": outcome})
    await asyncio.gather(*(second(model, items) for model, items in jobs.items()))
    if jobs:
        metrics.stage.observe(time.perf_counter() - detected, tags={**tags, "stage": "second"})
    return {
        "pipeline": pipeline.name,
        "detector": {"model": detector.name, "version": detector.version},
        "results": results,
    }


def _second_result(host: ModelHost, output: Any) -> dict[str, Any]:
    return {"model": host.name, "version": host.version, **host.task.result(host.meta, output)}


# ------------------------------------------------------------ the Open Inference Protocol

PLATFORM = "convnext-serve_pipeline"
VERSION = "1"  # a pipeline is config, not weights: one version


def tensor_outputs(pipeline: PipelineConfig, tasks: dict[str, str]) -> list[tuple[str, str, list]]:
    """(name, datatype, shape) of a pipeline's output tensors, by image and box (-1: any
    size): the detector's boxes, then each box's crop and second model's answer. `tasks`: the
    task of each step's model."""
    outputs = [
        ("boxes", "FP32", [-1, -1, 4]),
        ("scores", "FP32", [-1, -1]),
        ("class_ids", "INT32", [-1, -1]),
        ("labels", "BYTES", [-1, -1]),
        ("num_detections", "INT32", [-1]),
        ("crop_boxes", "INT32", [-1, -1, 4]),
        ("box_models", "BYTES", [-1, -1]),
        ("box_errors", "BYTES", [-1, -1]),
    ]
    step_tasks = {tasks[step.model] for step in pipeline.steps}
    if "classify" in step_tasks:
        outputs += [
            ("box_class_ids", "INT32", [-1, -1, -1]),
            ("box_scores", "FP32", [-1, -1, -1]),
            ("box_labels", "BYTES", [-1, -1, -1]),
        ]
    if "segment" in step_tasks:
        outputs.append(("box_class_maps", "BYTES", [-1, -1]))
    return outputs


def tensors(pipeline: PipelineConfig, tasks: dict[str, str], answer: dict) -> dict[str, Any]:
    """A pipeline's answer (`run_pipeline`'s) as its output tensors: [images, boxes, ...],
    padded to the most boxes of an image (`num_detections` says how many are real) and a
    classifier's answers to the largest `top_k` of its steps; padding is 0, -1 for ids and
    empty for BYTES. A box held back has crop [0, 0, 0, 0] and its reason in `box_errors`."""
    results = answer["results"]
    n, m = len(results), max((len(r["detections"]) for r in results), default=0)
    k = max((s.top_k for s in pipeline.steps if tasks[s.model] == "classify"), default=0)
    out: dict[str, Any] = {
        "boxes": np.zeros((n, m, 4), np.float32),
        "scores": np.zeros((n, m), np.float32),
        "class_ids": np.full((n, m), -1, np.int32),
        "labels": [[b""] * m for _ in range(n)],
        "num_detections": np.zeros(n, np.int32),
        "crop_boxes": np.zeros((n, m, 4), np.int32),
        "box_models": [[b""] * m for _ in range(n)],
        "box_errors": [[b""] * m for _ in range(n)],
    }
    if k:
        out["box_class_ids"] = np.full((n, m, k), -1, np.int32)
        out["box_scores"] = np.zeros((n, m, k), np.float32)
        out["box_labels"] = [[[b""] * k for _ in range(m)] for _ in range(n)]
    if "segment" in {tasks[s.model] for s in pipeline.steps}:
        out["box_class_maps"] = [[b""] * m for _ in range(n)]
    for i, result in enumerate(results):
        out["num_detections"][i] = len(result["detections"])
        for j, d in enumerate(result["detections"]):
            out["boxes"][i, j], out["scores"][i, j] = d["box"], d["score"]
            out["class_ids"][i, j], out["labels"][i][j] = d["class_id"], d["label"].encode()
            out["box_errors"][i][j] = d.get("error", "").encode()
            if "crop" in d:
                out["crop_boxes"][i, j] = d["crop"]
            if "classify" in d:
                second = d["classify"]
                out["box_models"][i][j] = second["model"].encode()
                for c, p in enumerate(second["predictions"]):
                    out["box_class_ids"][i, j, c] = p["class_id"]
                    out["box_scores"][i, j, c] = p["score"]
                    out["box_labels"][i][j][c] = p["label"].encode()
            elif "segment" in d:
                second = d["segment"]
                out["box_models"][i][j] = second["model"].encode()
                out["box_class_maps"][i][j] = base64.b64decode(second["mask"]["data"])
    return out
