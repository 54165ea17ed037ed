"""Images in: one decoder for training, evaluation and serving, and uint8 -> float tensors.

`decode_image` is the only way bytes become pixels in this project, so a model is evaluated on
the pixels it is served: the pixel count is read from the header before any pixel is decoded;
JPEGs decode in Pillow's draft mode (DCT scaling by 1/2, 1/4, 1/8) when the model needs far
fewer pixels than the photo has; EXIF orientation is applied; grayscale, palette, CMYK, 16-bit
and alpha images become RGB (alpha over white).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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


def _orientation(image: Image.Image, loaded: bool = False) -> int:
    if image.format == "PNG" and not loaded and "exif" not in image.info:
        # Pillow would decode the pixels to look for an eXIf chunk after them, and a failure
        # there would be swallowed here, leaving half-decoded pixels: read it after `load`
        return 1
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        return 1


@dataclass
class ImageHeader:
    """What the header says, read before any pixel is decoded."""

    image: Image.Image  # opened, pixels not yet loaded
    format: str
    width: int  # upright (after EXIF orientation)
    height: int
    orientation: int  # EXIF orientation, 1 = as stored

    @property
    def plain_jpeg(self) -> bool:
        """A baseline RGB or grayscale JPEG: what a GPU decoder (nvJPEG) takes."""
        info = self.image.info
        return (
            self.format == "JPEG"
            and self.image.mode in ("RGB", "L")
            and not info.get("progressive")
            and not info.get("progression")
        )


def read_header(data: bytes, max_pixels: int | None = None, orient: bool = True) -> ImageHeader:
    """The image's format, upright size and orientation; refuses what the service cannot take,
    and images over `max_pixels`, before their pixels are decoded."""
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
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f}",
        )
    orientation = _orientation(image) if orient else 1
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return ImageHeader(image, image.format, width, height, orientation)


def decode_image(
    data: bytes,
    max_pixels: int | None = None,
    min_short_side: int | None = None,
    orient: bool = True,
    header: ImageHeader | None = None,
) -> DecodedImage:
    """Decode `data` to RGB, refusing images over `max_pixels` before decoding them.

    With `min_short_side`, a JPEG may decode at a reduced DCT scale as long as its short side
    stays at least that long (the caller resizes precisely afterwards). `orient=False` keeps
    the stored pixel order (for annotations made on the stored pixels). `header`: one already
    read from these bytes.
    """
    header = header or read_header(data, max_pixels, orient)
    image, orientation = header.image, header.orientation if orient else 1
    width, height = header.width, header.height
    try:
        if image.format in ("JPEG", "MPO") and min_short_side:
            scale = min(image.size) / min_short_side
            if scale >= 2:
                # Pillow picks the largest DCT reduction that keeps the size >= the request.
                factor = min(8, 2 ** int(np.log2(scale)))
                image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
        image.seek(0)  # GIF and multi-page TIFF: the first frame
        image.load()
        if orient and image.format == "PNG" and orientation == 1:  # eXIf after the pixels
            orientation = _orientation(image, loaded=True)
            if orientation in _SWAPS_AXES:
                width, height = height, width
        image = ImageOps.exif_transpose(image) if orientation != 1 else image
        pixels = _to_rgb(image)
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt pixel data
        raise ImageError("invalid_image", f"the image data is truncated or corrupt: {e}") from None
    return DecodedImage(pixels=pixels, width=width, height=height)


def orient_chw(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) tensor in its stored pixel order turned upright by its EXIF orientation, on
    any device: what `ImageOps.exif_transpose` does to a PIL image."""
    h, w = -2, -1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:  # transpose
        return image.transpose(h, w)
    if orientation == 6:  # 90 degrees clockwise
        return image.transpose(h, w).flip(w)
    if orientation == 7:  # transverse
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:  # 90 degrees counter-clockwise
        return image.transpose(h, w).flip(h)
    return image


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
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # no copy


def read_image(
    path: str | Path, match_size: tuple[int, int] | None = None, min_short_side: int | None = None
) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 RGB tensor, decoded exactly as the service decodes.

    With `match_size` (H, W) from an annotation: when only the stored pixels, not the EXIF
    upright ones, have that size, the annotation was made on the stored pixels and those are
    returned (a rotated photo would no longer line up with its boxes or label map).
    `min_short_side` as for `decode_image` (evaluation decodes as the service does).
    """
    data = Path(path).read_bytes()
    try:
        decoded = decode_image(data, min_short_side=min_short_side)
        if match_size is not None and (decoded.height, decoded.width) != tuple(match_size):
            stored = decode_image(data, orient=False)
            if (stored.height, stored.width) == tuple(match_size):
                decoded = stored
    except ImageError as e:
        raise ValueError(f"{path}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(decoded.pixels.transpose(2, 0, 1)))


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


def padded_size_groups(sizes: Sequence[tuple[int, int]], stride: int) -> list[list[int]]:
    """Indices of `sizes` (H, W) grouped by their size padded up to a multiple of `stride`, in
    order of first appearance.

    A dense model's batch is padded to its largest image; run per group, each image gets only
    the padding it would get alone, so its answer does not depend on what it was batched with.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        key = (-(-int(h) // stride) * stride, -(-int(w) // stride) * stride)
        groups.setdefault(key, []).append(i)
    return list(groups.values())
