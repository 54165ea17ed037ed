"""The preprocessing each served model was made for, carried by its checkpoint's metadata.

As torchvision's weights carry their transforms (`transforms/_presets.py`), a checkpoint's
`CheckpointMeta` decides how an image becomes the model's input; `preset_for(meta)` gives that
one preprocessing, used alike by evaluation and serving. A preset works on uint8 (3, H, W)
tensors on any device (the service's GPU replicas resize decoded photos on the GPU), and says
how many pixels its decoder must keep (`min_short_side`), so JPEGs decode no larger than needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from .checkpoint import CheckpointMeta
from .classification import resize_crop

DETECT_MAX_SIZE = 1333  # torchvision's / mmdet's long-side cap for COCO detectors
SEGMENT_LONG_SIDE_FACTOR = 4  # UperNet inference: long side at most 4x the crop size


@dataclass(frozen=True)
class ClassifyPreset:
    """Short side to `image_size / crop_pct`, centre crop `image_size` (the ImageNet eval view)."""

    image_size: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @property
    def resize_size(self) -> int:
        return int(self.image_size / self.crop_pct)

    @property
    def min_short_side(self) -> int:
        return math.ceil(self.image_size / self.crop_pct)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> uint8 (3, image_size, image_size)."""
        return resize_crop(image, self.image_size, self.crop_pct, self.interpolation)


@dataclass(frozen=True)
class FitPreset:
    """Downscale (never up) so the short side is at most `short` and the long side at most
    `long`: what a detector's or segmenter's own transform would keep of the image, so no more
    pixels than that travel to the model (which resizes exactly itself)."""

    short: int
    long: int

    @property
    def min_short_side(self) -> int:
        return self.short

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        scale = min(self.short / min(height, width), self.long / max(height, width))
        if scale >= 1:
            return height, width
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        size = self.size_for(*image.shape[-2:])
        if size == tuple(image.shape[-2:]):
            return image
        return TF.resize(image, list(size), antialias=True)


def preset_for(meta: CheckpointMeta) -> ClassifyPreset | FitPreset:
    """The preprocessing of a served model, from its checkpoint metadata."""
    if meta.task == "classify":
        return ClassifyPreset(meta.image_size, meta.crop_pct, meta.interpolation)
    if meta.task == "detect":
        return FitPreset(meta.image_size, int(meta.model_kwargs.get("max_size", DETECT_MAX_SIZE)))
    return FitPreset(meta.image_size, SEGMENT_LONG_SIDE_FACTOR * meta.image_size)
