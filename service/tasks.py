"""One adapter per task: its per-image options, its batch call, and its JSON answer.

The runtime and the routes know tasks only through these: `run` takes a batch of preprocessed
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

    def run(self, runner: Any, images: list[torch.Tensor], sizes: list[tuple[int, int]],
            options: list[Any]) -> list[Any]:  # fmt: skip
        """Outputs for a batch, in order; `sizes` are the original (H, W) to answer in."""
        raise NotImplementedError

    def result(self, meta: CheckpointMeta, output: Any) -> dict:
        raise NotImplementedError


class Classify(Task):
    name, options = "classify", ClassifyOptions

    def run(self, runner, images, sizes, options) -> list[list[tuple[int, float]]]:
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

    def result(self, meta, output) -> dict:
        return {
            "predictions": [
                {"label": meta.labels[c], "class_id": c, "score": round(s, 6)} for c, s in output
            ]
        }


class Detect(Task):
    name, options = "detect", DetectOptions

    def run(self, runner, images, sizes, options) -> list[Detections]:
        return detect(
            runner.model, images,
            score_threshold=[o.score_threshold for o in options],
            max_detections=[o.max_detections for o in options],
            masks=[o.masks for o in options],
            output_sizes=sizes,
        )  # fmt: skip

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

    def run(self, runner, images, sizes, options) -> list[np.ndarray]:
        maps = segment(
            runner.model, images, image_size=runner.meta.image_size, output_sizes=sizes,
            mode="slide" if runner.config.sliding_window else "whole",
        )  # fmt: skip
        dtype = np.uint8 if runner.meta.num_classes <= 256 else np.uint16
        return [m.cpu().numpy().astype(dtype) for m in maps]

    def result(self, meta, output: np.ndarray) -> dict:
        counts = np.bincount(output.ravel(), minlength=meta.num_classes)
        total = max(1, output.size)
        classes = [
            {"class_id": int(c), "label": meta.labels[c],
             "pixel_fraction": round(counts[c] / total, 6)}
            for c in np.flatnonzero(counts)
        ]  # fmt: skip
        png = base64.b64encode(draw.class_map_png(output)).decode()
        return {
            "width": int(output.shape[1]),
            "height": int(output.shape[0]),
            "classes": classes,
            "mask": {"format": "png", "data": png},
        }


TASKS: dict[str, Task] = {t.name: t for t in (Classify(), Detect(), Segment())}
