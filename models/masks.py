"""Instance masks: paste RoI masks at image size without full-image float tensors, COCO RLE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict:
    """A binary (H, W) mask as COCO compressed RLE: `{"size": [H, W], "counts": str}`."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))  # copies only if needed
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def decode_rle(rle: dict) -> np.ndarray:
    """The binary (H, W) bool mask of an RLE made by `encode_rle` (or any COCO RLE)."""
    return mask_utils.decode(rle).astype(bool)  # counts as str or bytes, as pycocotools takes


def paste_masks_rle(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> list[dict]:
    """RLE masks at (height, width) from RoI mask probabilities (K, M, M) and boxes (K, 4).

    The geometry is torchvision's `paste_masks_in_image` (one pixel of mask padding, boxes scaled
    to match), but each mask is resized only over its box and written into one reused uint8
    canvas, so memory stays at one image of bytes however many detections a big image has.
    """
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    if masks.shape[0] == 0:
        return []
    masks, scale = expand_masks(masks.float(), padding=1)
    boxes = expand_boxes(boxes.float(), scale).to(torch.int64).tolist()
    canvas = np.zeros((height, width), dtype=np.uint8, order="F")
    out = []
    for mask, (x0b, y0b, x1b, y1b) in zip(masks, boxes, strict=True):
        w, h = max(x1b - x0b + 1, 1), max(y1b - y0b + 1, 1)
        local = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)
        x0, x1 = max(x0b, 0), min(x1b + 1, width)
        y0, y1 = max(y0b, 0), min(y1b + 1, height)
        if x1 > x0 and y1 > y0:
            crop = local[0, 0, y0 - y0b : y1 - y0b, x0 - x0b : x1 - x0b]
            canvas[y0:y1, x0:x1] = (crop >= threshold).cpu().numpy()
        out.append(encode_rle(canvas))
        canvas[y0:y1, x0:x1] = 0
    return out
