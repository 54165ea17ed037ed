"""The inference runtime of a model replica, free of Ray so it can run and be tested in-process.

It picks the device from what the replica got, loads the served checkpoint, applies the
precision (fp32 / bf16 / fp16 autocast), `channels_last`, TF32 on CUDA and optionally
`torch.compile`, warms up at full batch size, and runs batches of uint8 images that the gateway
already decoded and resized: normalisation happens here, on the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import load_checkpoint
from models.checkpoint import CheckpointMeta
from models.classification import normalize
from models.cpu import bf16_unsupported_reason, fast_path_summary
from models.detection import detect
from models.segmentation import segment

from .config import ModelConfig

log = logging.getLogger("ray.serve")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnsupportedPrecision(ValueError):
    """The configured precision has no fast kernels on this device."""


def resolve_checkpoint(spec: str) -> Path:
    """`demo:<task>` -> the demo model's path (built by `convnext-serve run` beforehand)."""
    if spec.startswith("demo:"):
        from models.demo import demo_checkpoint

        return demo_checkpoint(spec.removeprefix("demo:"))
    return Path(spec).expanduser()


def pick_device(config: ModelConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class ClassifyItem:
    image: np.ndarray  # (3, S, S) uint8, already resized and cropped
    top_k: int


@dataclass
class DetectItem:
    image: np.ndarray  # (3, h, w) uint8, possibly downscaled from the original
    original_size: tuple[int, int]  # (H, W) to report results in
    score_threshold: float
    max_detections: int
    masks: bool


@dataclass
class SegmentItem:
    image: np.ndarray  # (3, h, w) uint8
    original_size: tuple[int, int]


class ModelRunner:
    """One loaded model and how to run a batch of requests through it.

    Every piece of torch work (loading, warm-up, batches) happens on one dedicated thread. On
    the CPU each thread that runs torch ops gets an OpenMP team of its own; with more than one
    team in a process, libgomp counts more threads than cores and stops its workers from
    spinning between parallel regions, and a ConvNeXt-T forward then takes 1.5x as long.
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self.device = pick_device(config)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"inference-{config.name}")
        self._thread.submit(self._load).result()

    def _load(self) -> None:
        config = self.config
        if self.device.type == "cpu":
            torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model, self.meta = load_checkpoint(resolve_checkpoint(config.checkpoint), self.device)
        # On a GPU, classification batches are padded up to a few bucket sizes, all warmed up,
        # so cuDNN's autotuner sees every shape before the first request and never again;
        # without buckets each new batch size stalls a request for the tuning. Detection and
        # segmentation inputs vary in size, so they keep cuDNN's heuristics.
        bucketed = self.device.type == "cuda" and self.meta.task == "classify"
        self.buckets = _batch_buckets(config.max_batch_size) if bucketed else []
        if bucketed:
            torch.backends.cudnn.benchmark = True
        self.model = model.to(memory_format=torch.channels_last)
        dtype = DTYPES[config.precision]
        if dtype is not None and self.device.type == "cpu":
            dtype = torch.bfloat16  # fp16 kernels are slow or missing on CPUs
            reason = bf16_unsupported_reason()
            if reason is not None:  # refused here rather than served ten times slower
                as_bf16 = " (bf16 on a CPU)" if config.precision == "fp16" else ""
                raise UnsupportedPrecision(
                    f"model {config.name!r}: precision {config.precision}{as_bf16} is refused: "
                    f"{reason}; set precision: fp32 for this model"
                )
        self.dtype = dtype
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        if self.device.type == "cpu":
            log.info("model %r: %s", config.name, fast_path_summary())
        if config.compile:
            self.model = torch.compile(self.model)

    @property
    def task(self) -> str:
        return self.meta.task

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def warmup(self) -> None:
        """Full-size batches (and every bucket size) through every code path, so the first
        request pays no setup."""
        size = self.meta.image_size
        n = self.config.max_batch_size
        rng = np.random.default_rng(0)
        for _ in range(self.config.warmup_batches):
            img = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
            if self.task == "classify":
                for bucket in self.buckets or [n]:
                    self.run([ClassifyItem(img, 5)] * bucket)
            elif self.task == "detect":
                self.run([DetectItem(img, (size, size), 0.5, 100, True)] * n)
            else:
                self.run([SegmentItem(img, (size, size))] * n)

    def run(self, items: list) -> list[Any]:
        """Results for a batch of items of this runner's task, in order (blocking)."""
        return self.submit(items).result()

    def submit(self, items: list) -> Future:
        """Queue a batch on the inference thread; the future holds `run`'s results."""
        return self._thread.submit(self._run, items)

    @torch.inference_mode()
    def _run(self, items: list) -> list[Any]:
        with self._autocast():
            if self.task == "classify":
                return self._classify(items)
            if self.task == "detect":
                return self._detect(items)
            return self._segment(items)

    def _classify(self, items: list[ClassifyItem]) -> list[list[tuple[int, float]]]:
        images = np.stack([it.image for it in items])
        bucket = next((b for b in self.buckets if b >= len(items)), len(items))
        if bucket > len(items):  # zero images up to the bucket size (np.pad always copies)
            images = np.pad(images, [(0, bucket - len(items))] + [(0, 0)] * 3)
        x = normalize(torch.from_numpy(images), self.meta.mean, self.meta.std, self.device)
        probs = self.model(x)[: len(items)].float().softmax(dim=-1)
        k = min(max(it.top_k for it in items), probs.shape[1])
        scores, ids = probs.topk(k, dim=-1)
        scores, ids = scores.cpu().tolist(), ids.cpu().tolist()
        return [
            list(zip(ids[i][: it.top_k], scores[i][: it.top_k], strict=True))
            for i, it in enumerate(items)
        ]

    def _detect(self, items: list[DetectItem]) -> list:
        results = detect(
            self.model,
            [torch.from_numpy(it.image) for it in items],
            score_threshold=[it.score_threshold for it in items],
            max_detections=[it.max_detections for it in items],
            masks=[it.masks for it in items],
            output_sizes=[it.original_size for it in items],
        )
        return results

    def _segment(self, items: list[SegmentItem]) -> list[np.ndarray]:
        maps = segment(
            self.model,
            [torch.from_numpy(it.image) for it in items],
            image_size=self.meta.image_size,
            output_sizes=[it.original_size for it in items],
            mode="slide" if self.config.sliding_window else "whole",
        )
        dtype = np.uint8 if self.meta.num_classes <= 256 else np.uint16
        return [m.cpu().numpy().astype(dtype) for m in maps]

    def describe(self) -> dict[str, Any]:
        """What `/v1/models` shows of this model."""
        c = self.config
        return {
            "name": c.name,
            "task": self.task,
            "device": self.device.type,
            "precision": self.precision,
            "metadata": _public_meta(self.meta),
            "serving": {
                "max_batch_size": c.max_batch_size,
                "batch_wait_timeout_s": c.batch_wait_timeout_s,
                "max_ongoing_requests": c.ongoing,
                "max_queued_requests": c.max_queued_requests,
                "num_replicas": c.num_replicas,
                "autoscaling_config": c.autoscaling_config,
                "compile": c.compile,
            },
        }


def _batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself: 1, 2, 4, ..., max."""
    buckets = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) < max_batch_size]
    return [*buckets, max_batch_size]


def _public_meta(meta: CheckpointMeta) -> dict[str, Any]:
    return meta.model_dump(mode="json")
