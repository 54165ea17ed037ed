"""Image tensors for inference: uint8 RGB in, float on the model's device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def as_chw_uint8(image: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    """A (3, H, W) uint8 tensor from a (3, H, W) tensor, an (H, W, 3) array or a PIL image."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 RGB image (3, H, W), got {image.dtype} {image.shape}")
    return image


def to_float_images(
    images: Sequence[torch.Tensor | np.ndarray], device: torch.device | str
) -> list[torch.Tensor]:
    """uint8 images to float32 in [0, 1], converted on `device` (a quarter of the bytes move)."""
    return [as_chw_uint8(img).to(device, non_blocking=True).float().div_(255.0) for img in images]
