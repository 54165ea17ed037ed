"""Results drawn over the input image, for people (`render=true`): PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.masks import decode_rle


def palette(n: int) -> np.ndarray:
    """n distinct, stable RGB colours (golden-angle hues); class 0 of a segmenter is grey."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = np.stack([_hsv_to_rgb(h, 0.75, 0.95) for h in hues]) if n else np.zeros((0, 3))
    return (rgb * 255).astype(np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def render_detections(
    pixels: np.ndarray, detections: list[dict], labels: list[str], scale: tuple[float, float]
) -> bytes:
    """Masks tinted, boxes outlined and labelled with class and score.

    `scale` maps result coordinates (the original image's) to `pixels` (maybe downscaled).
    """
    colours = palette(len(labels))
    out = pixels.astype(np.float32)
    h, w = pixels.shape[:2]
    for det in detections:
        if det.get("mask"):
            mask = decode_rle(det["mask"])
            if mask.shape != (h, w):
                mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
            out[mask] = 0.55 * out[mask] + 0.45 * colours[det["class_id"]]
    image = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    sx, sy = scale
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        colour = tuple(int(c) for c in colours[det["class_id"]])
        draw.rectangle(box, outline=colour, width=2)
        text = f"{det['label']} {det['score']:.2f}"
        tx, ty = box[0], max(0, box[1] - 12)
        draw.rectangle(draw.textbbox((tx, ty), text, font=font), fill=colour)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    return png_bytes(image)


def render_segmentation(pixels: np.ndarray, class_map: np.ndarray, n_classes: int) -> bytes:
    """The colour-coded class map blended over the image."""
    h, w = pixels.shape[:2]
    if class_map.shape != (h, w):
        class_map = np.asarray(Image.fromarray(class_map).resize((w, h), Image.NEAREST))
    colours = palette(n_classes)
    colours[0] = (128, 128, 128)
    blended = 0.5 * pixels.astype(np.float32) + 0.5 * colours[class_map].astype(np.float32)
    return png_bytes(Image.fromarray(blended.astype(np.uint8)))


def class_map_png(class_map: np.ndarray) -> bytes:
    """One class id per pixel: 8-bit grayscale PNG, 16-bit for more than 256 classes."""
    return png_bytes(Image.fromarray(class_map))  # uint8 -> mode L, uint16 -> mode I;16
