"""Classification inference: the eval preprocessing a checkpoint was made for, and top-k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .images import as_chw_uint8

INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def resize_crop(
    image: torch.Tensor, image_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> torch.Tensor:
    """The standard ImageNet eval view: short side to image_size / crop_pct, center crop.

    uint8 (3, H, W) in and out, so the bytes that cross to the model stay compact.
    """
    short = int(image_size / crop_pct)  # presets.ClassifyPreset.resize_size
    image = as_chw_uint8(image)
    h, w = image.shape[-2:]
    if max(h, w) > 2 * min(h, w):
        # Only the centre survives the crop: resize the centre square, not the whole strip
        # (a 1 x 40000 image would otherwise ask for a 256 x 10,240,000 resize).
        image = TF.center_crop(image, [min(h, w), min(h, w)])
    image = TF.resize(image, [short], interpolation=INTERPOLATION[interpolation], antialias=True)
    return TF.center_crop(image, [image_size, image_size])


def normalize(
    batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> torch.Tensor:
    """uint8 (N, 3, H, W) to normalised float on `device`, channels_last (done on the device)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)
