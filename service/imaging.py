"""Image decoding for the gateway: limits first, then only as many pixels as the model needs.

The pixel count is read from the header before any pixel is decoded; JPEGs decode in Pillow's
draft mode (DCT scaling by 1/2, 1/4, 1/8) when the model needs far fewer pixels than the photo
has; EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and alpha images become RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit from the header; Pillow's bomb check would only duplicate it.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageError(ValueError):
    """An image the service cannot take; `code` is the API error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class DecodedImage:
    """RGB pixels (H, W, 3) uint8, possibly downscaled, and the original upright size."""

    pixels: np.ndarray
    width: int  # of the original image, after EXIF orientation
    height: int


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        return 1


def decode(data: bytes, max_pixels: int, min_short_side: int | None = None) -> DecodedImage:
    """Decode `data` to RGB, refusing images over `max_pixels` before decoding them.

    With `min_short_side`, a JPEG may decode at a reduced DCT scale as long as its short side
    stays at least that long (the caller resizes precisely afterwards).
    """
    if not data:
        raise ImageError("invalid_image", "the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            "invalid_image", "not a decodable image (JPEG, PNG, WebP, BMP, GIF, TIFF)"
        ) from None
    except Exception as e:
        raise ImageError("invalid_image", f"cannot read the image header: {e}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageError("invalid_image", f"{image.format} images are not supported")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f}",
        )
    orientation = _orientation(image)
    if orientation in _SWAPS_AXES:
        width, height = height, width
    try:
        if image.format in ("JPEG", "MPO") and min_short_side:
            scale = min(image.size) / min_short_side
            if scale >= 2:
                # Pillow picks the largest DCT reduction that keeps the size >= the request.
                factor = min(8, 2 ** int(np.log2(scale)))
                image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
        image.seek(0)  # GIF and multi-page TIFF: the first frame
        image.load()
        image = ImageOps.exif_transpose(image) if orientation != 1 else image
        pixels = _to_rgb(image)
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt pixel data
        raise ImageError("invalid_image", f"the image data is truncated or corrupt: {e}") from None
    return DecodedImage(pixels=pixels, width=width, height=height)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 from any mode: 16-bit scaled down (not clipped), alpha over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(1.0, float(values.max()))
        gray = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        gray = ((values - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))
