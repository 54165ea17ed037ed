"""Served checkpoints: one `.safetensors` file, the model's state dict plus JSON metadata.

The metadata lives under the safetensors header key `convnext_serve` (docs/checkpoints.md). Loading
never unpickles anything, and every way a file can be wrong ends in one `CheckpointError` that
names the file and the problem.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .registry import build_model, model_task

META_KEY = "convnext_serve"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_OF_TASK = {"classify": "linear", "detect": "maskrcnn", "segment": "upernet"}


class CheckpointError(ValueError):
    """A served checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")

    source: Literal["trained", "converted"]
    dataset: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())


class CheckpointMeta(BaseModel):
    """What a served model needs besides its tensors: task, architecture, labels, preprocessing.

    `model_kwargs` holds extra `build_model` arguments the tensors depend on (for example a
    detector's `min_size`/`max_size`).
    """

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    task: Literal["classify", "detect", "segment"]
    arch: str
    head: Literal["linear", "maskrcnn", "upernet"]
    num_classes: int = Field(ge=1)
    labels: list[str]
    # at least the backbone's total stride: a smaller input has no pixel left for the last
    # stage, and the model could load but never answer
    image_size: int = Field(default=224, ge=32)
    crop_pct: float = Field(default=0.875, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    provenance: Provenance
    model_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointMeta:
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for num_classes={self.num_classes}")
        if HEAD_OF_TASK[self.task] != self.head:
            raise ValueError(f"task {self.task!r} needs head {HEAD_OF_TASK[self.task]!r}")
        return self


def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """Write `model`'s state dict and `meta` to `path` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={META_KEY: meta.model_dump_json()})
    os.replace(tmp, path)
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The metadata alone (reads only the header): what the service lists before loading."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({e})") from None
    if META_KEY not in header:
        raise CheckpointError(
            path,
            f"no '{META_KEY}' metadata: not a served checkpoint "
            "(turn upstream weights into one with `convnext-serve convert`)",
        )
    try:
        meta = CheckpointMeta.model_validate(json.loads(header[META_KEY]))
    except (json.JSONDecodeError, ValidationError) as e:
        raise CheckpointError(path, f"bad metadata: {_one_line(e)}") from None
    try:
        task = model_task(meta.arch)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if task != meta.task:
        raise CheckpointError(
            path, f"arch {meta.arch!r} is a {task} model, metadata says {meta.task}"
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Load a served checkpoint: an eval-mode model on `device` and its metadata."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        tensors = read_tensors(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"tensor data unreadable, truncated or corrupt ({e})") from None
    try:
        model = build_model(meta.arch, num_classes=meta.num_classes, **meta.model_kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"cannot build {meta.arch}: {e}") from None
    problem = state_dict_mismatch(model.state_dict(), tensors)
    if problem:
        raise CheckpointError(path, f"tensors do not match {meta.arch}: {problem}")
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def init_backbone(model: nn.Module, source: str | os.PathLike) -> list[str]:
    """Load another checkpoint's ConvNeXt backbone into a dense model's.

    From a classifier, the paper's path (pre-training, then detection/segmentation fine-tuning):
    its stem and stages; its pooling norm and head are left out, and the dense model's per-stage
    norms and heads start fresh. From a dense model (a detector, a segmenter): its whole
    backbone, per-stage norms included, for a model that should start from features already
    fine-tuned to dense prediction. Returns the backbone keys that were loaded.
    """
    from .convnext import ConvNeXt

    path = Path(source)
    meta = read_checkpoint_meta(path)
    backbone = next((m for m in model.modules() if isinstance(m, ConvNeXt)), None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no ConvNeXt backbone")
    tensors = read_tensors(path)
    expected = backbone.state_dict()
    if meta.task == "classify":
        expected = {k: v for k, v in expected.items() if not k.startswith("norm")}
    else:  # the dense model's backbone, wherever it sits in that model
        stem = "downsample_layers.0.0.weight"
        prefix = next((k[: -len(stem)] for k in tensors if k.endswith(stem)), None)
        if prefix is None:
            raise CheckpointError(path, f"{meta.arch} has no ConvNeXt backbone")
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    tensors = {
        k: v for k, v in tensors.items() if k in expected or k.startswith(("downsample", "stages"))
    }
    problem = state_dict_mismatch(expected, tensors)
    if problem:
        raise CheckpointError(path, f"backbone of {meta.arch} does not fit this model: {problem}")
    backbone.load_state_dict(tensors, strict=meta.task != "classify")
    return sorted(tensors)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    # safe_open checks the header's offsets against the file size, so truncation is caught here.
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def state_dict_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """'' when `got` fits `expected` key for key and shape for shape, else what differs."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
