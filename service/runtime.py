"""The inference runtime of a model, free of Ray so it can run and be tested in-process.

It picks the device from what the replica got, loads the served checkpoint, applies the
precision (fp32 / bf16 / fp16 autocast), `channels_last`, TF32 on CUDA and optionally
`torch.compile`, warms up every batch size it will run, and runs batches of *encoded* images:

- `prepare`: decode and preprocess (the checkpoint's preset, `models.presets`). On a CUDA
  device plain JPEGs decode on the GPU in one batched nvJPEG call and are resized there; other
  formats decode on the CPU with Pillow (as on CPU replicas) and are copied from pinned memory,
  all on a stream of their own, so the next batch is prepared while the current one runs.
- `forward`: the task's batch call (`service.tasks`) on the prepared images.

An image that does not decode fails alone: its place in the results holds its `ImageError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import CheckpointError, load_checkpoint
from models.cpu import bf16_unsupported_reason, fast_path_summary
from models.images import ImageError, decode_image, orient_chw, read_header
from models.presets import preset_for

from .config import ModelConfig
from .tasks import ADAPTERS

log = logging.getLogger("ray.serve")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnsupportedPrecision(ValueError):
    """The configured precision has no fast kernels on this device."""


class ModelLoadError(ValueError):
    """A model's checkpoint cannot be loaded; says which model, and why."""


def resolve_checkpoint(spec: str) -> Path:
    """`demo:<task>` -> the demo model's path (built by `convnext-serve run` beforehand);
    `pretrained:<release>` -> the official release, converted (on this node, if not yet)."""
    if spec.startswith("demo:"):
        from models.demo import demo_checkpoint

        return demo_checkpoint(spec.removeprefix("demo:"))
    if spec.startswith("pretrained:"):
        from models.convert import pretrained_checkpoint

        return pretrained_checkpoint(spec.removeprefix("pretrained:"))
    return Path(spec).expanduser()


def pick_device(config: ModelConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class BatchItem:
    """One image to run: encoded bytes, or RGB pixels (H, W, 3) uint8; and its options."""

    data: bytes | np.ndarray
    options: Any


@dataclass
class Prepared:
    """A batch ready for the model: the images that decoded, and what became of each entry."""

    images: list[torch.Tensor] = field(default_factory=list)  # preprocessed, on the device
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original upright (H, W)
    options: list[Any] = field(default_factory=list)
    errors: dict[int, ImageError] = field(default_factory=dict)  # entry index -> its error
    decode_seconds: list[float] = field(default_factory=list)
    forward_seconds: float = 0.0
    ready: Any = None  # a CUDA event: the preparing stream's work is done


# One inference thread per process, shared by every model the process serves. On the CPU each
# thread that runs torch ops gets an OpenMP team of its own; with more than one team in a
# process, libgomp counts more threads than cores and stops its workers from spinning between
# parallel regions, and every forward pass slows down.
INFERENCE_THREAD = ThreadPoolExecutor(1, thread_name_prefix="inference")


class ModelRunner:
    """One loaded model: prepares batches of encoded images and runs them."""

    def __init__(self, config: ModelConfig, max_pixels: int | None = None):
        self.config = config
        self.max_pixels = max_pixels
        self.device = pick_device(config)
        self.task = None
        self._prepare_thread: ThreadPoolExecutor | None = None
        self._stream = None
        INFERENCE_THREAD.submit(self._load).result()

    def _load(self) -> None:
        config = self.config
        self._threads = config.torch_threads or os.cpu_count() or 1
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads)
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        try:
            model, self.meta = load_checkpoint(resolve_checkpoint(config.checkpoint), self.device)
        except CheckpointError as e:  # the replica fails with this: name the model it was
            raise ModelLoadError(f"model {config.name!r}: {e}") from None
        self.task = ADAPTERS[self.meta.task]
        self.preset = preset_for(self.meta)
        # On a GPU, classification batches are padded up to a few bucket sizes, all warmed up,
        # so cuDNN's autotuner sees every shape before the first request and never again;
        # without buckets each new batch size stalls a request for the tuning. Detection and
        # segmentation inputs vary in size, so they keep cuDNN's heuristics.
        bucketed = self.device.type == "cuda" and self.meta.task == "classify"
        self.buckets = _batch_buckets(config.max_batch_size) if bucketed else []
        if bucketed:
            torch.backends.cudnn.benchmark = True
        self.model = model.to(memory_format=torch.channels_last)
        dtype = AUTOCAST_DTYPES[config.precision]
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
        else:  # the next batch is prepared on its own thread and stream while this one runs
            self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix="prepare")
            self._stream = torch.cuda.Stream(self.device)
        if config.compile:
            self.model = torch.compile(self.model)

    @property
    def pipelined(self) -> bool:
        """True when preparing a batch can overlap the model running the previous one."""
        return self._prepare_thread is not None

    # ------------------------------------------------------------------------- running

    def run_batch(self, entries: list[BatchItem]) -> list[Any]:
        """Results (or `ImageError`s) for a batch, in order (blocking)."""
        return self.submit(entries).result()[1]

    def submit(self, entries: list[BatchItem]) -> Future:
        """Prepare and run a batch in one step on the inference thread (no pipelining); the
        future holds (the prepared batch, its results)."""

        def both() -> tuple[Prepared, list[Any]]:
            prepared = self.prepare(entries)
            return prepared, self.forward(prepared)

        return INFERENCE_THREAD.submit(both)

    def submit_prepare(self, entries: list[BatchItem]) -> Future:
        """`prepare` on the preparing thread (CUDA) or the inference thread (CPU)."""
        return (self._prepare_thread or INFERENCE_THREAD).submit(self.prepare, entries)

    def submit_forward(self, prepared: Prepared) -> Future:
        return INFERENCE_THREAD.submit(self.forward, prepared)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _use_threads(self) -> None:
        """This model's CPU threads on the shared inference thread (models may differ)."""
        if self.device.type == "cpu" and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> list[Any]:
        started = time.perf_counter()
        self._use_threads()
        if prepared.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(prepared.ready)
        outputs = []
        if prepared.images:
            with self._autocast():
                outputs = self.task.predict(self, prepared.images, prepared.sizes, prepared.options)
        prepared.forward_seconds = time.perf_counter() - started
        results, it = [], iter(outputs)
        for i in range(len(prepared.options) + len(prepared.errors)):
            results.append(prepared.errors[i] if i in prepared.errors else next(it))
        return results

    # ----------------------------------------------------------------------- preparing

    @torch.inference_mode()
    def prepare(self, entries: list[BatchItem]) -> Prepared:
        """Decode and preprocess a batch; each entry's failure is kept in `errors`."""
        if self.device.type == "cuda":
            with torch.cuda.stream(self._stream):
                on_gpu = self._gpu_decoded(entries) if self.config.gpu_decode else {}
                prepared = self._prepare(entries, on_gpu)
                prepared.ready = torch.cuda.Event()
                prepared.ready.record(self._stream)
            return prepared
        self._use_threads()
        return self._prepare(entries, {})

    def _prepare(self, entries: list[BatchItem], on_gpu: dict[int, Any]) -> Prepared:
        out = Prepared()
        for i, entry in enumerate(entries):
            started = time.perf_counter()
            try:
                if i in on_gpu:
                    image, size = on_gpu[i]
                else:
                    image, size = self._decode_cpu(entry.data)
                image = self.preset(image)
            except ImageError as e:
                out.errors[i] = e
                continue
            out.images.append(image)
            out.sizes.append(size)
            out.options.append(entry.options)
            out.decode_seconds.append(time.perf_counter() - started)
        return out

    def _decode_cpu(self, data: bytes | np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pillow (draft mode, EXIF, limits from the header), then to the model's device."""
        if isinstance(data, np.ndarray):
            pixels = data
            size = data.shape[:2]
        else:
            decoded = decode_image(data, self.max_pixels, self.preset.min_short_side)
            pixels, size = decoded.pixels, (decoded.height, decoded.width)
        with warnings.catch_warnings():  # Pillow's pixels are read-only; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            image = torch.from_numpy(pixels).permute(2, 0, 1)
        if self.device.type == "cuda":
            image = image.pin_memory().to(self.device, non_blocking=True)
        return image, (int(size[0]), int(size[1]))

    def _gpu_decoded(self, entries: list[BatchItem]) -> dict[int, Any]:
        """{entry index: (upright image on the GPU, (H, W))} for the plain JPEGs of a batch,
        decoded in one nvJPEG call; the rest (and a batch nvJPEG refuses) go to Pillow."""
        headers = {}
        for i, entry in enumerate(entries):
            if isinstance(entry.data, bytes):
                with contextlib.suppress(ImageError):  # Pillow says why, in `_prepare`
                    header = read_header(entry.data, self.max_pixels)
                    # a truncated JPEG (no end marker) goes to Pillow, which refuses it
                    if header.plain_jpeg and entry.data.rstrip(b"\0").endswith(b"\xff\xd9"):
                        headers[i] = header
        if not headers:
            return {}
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            # decode_jpeg is deprecated in favour of TorchCodec, and still the batched GPU path;
            # frombuffer warns that the bytes are read-only, which decoding never minds
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = [torch.frombuffer(entries[i].data, dtype=torch.uint8) for i in headers]
                images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:  # one corrupt JPEG fails the batch: Pillow then says which
            log.debug("nvJPEG refused a batch (%s); decoding it with Pillow", e)
            return {}
        return {
            i: (orient_chw(image, h.orientation), (h.height, h.width))
            for (i, h), image in zip(headers.items(), images, strict=True)
        }

    # ------------------------------------------------------------------------- warm-up

    def start_warmup(self) -> Future:
        """`warmup` on the inference thread; the future is done when the model is ready."""
        return INFERENCE_THREAD.submit(self._warmup)

    def warmup(self) -> None:
        """Full-size batches (and every bucket size) through every code path, decode
        included, so the first request pays no setup (blocking)."""
        self.start_warmup().result()

    def _warmup(self) -> None:
        size = self.meta.image_size
        n = self.config.max_batch_size
        rng = np.random.default_rng(0)
        options = self.task.options()
        for _ in range(self.config.warmup_batches):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            entry = BatchItem(buf.getvalue(), options)
            for bucket in self.buckets or [n]:
                self.forward(self.prepare([entry] * bucket))

    def describe(self) -> dict[str, Any]:
        """What `/v1/models` shows of this model."""
        c = self.config
        return {
            "name": c.name,
            "task": self.meta.task,
            "device": self.device.type,
            "precision": self.precision,
            "metadata": self.meta.model_dump(mode="json"),
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
