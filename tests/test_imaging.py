"""The one image decoder (training, evaluation, serving): formats, modes, EXIF, draft mode,
limits before decoding."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from models.images import ImageError
from models.images import decode_image as decode

BIG = 10**9


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def red_square(mode="RGB", size=(60, 40)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((255, 0, 0), (10, 10, 30, 30))
    return image.convert(mode) if mode != "RGB" else image


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("GIF", {}),
        ("TIFF", {}),
    ],
)
def test_formats_decode_to_rgb(fmt, kw):
    out = decode(encode(red_square(), fmt, **kw), BIG)
    assert out.pixels.shape == (40, 60, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (60, 40)
    r, g, b = out.pixels[20, 20].astype(int)
    assert r > 200 and g < 60 and b < 60  # red where the square is
    assert out.pixels[2, 2].min() > 200  # white elsewhere


def test_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode(buf.getvalue(), BIG).pixels[4, 4, 2] > 200  # blue, the first frame


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    else:
        image = red_square(mode)
    out = decode(encode(image, fmt), BIG)
    assert out.pixels.shape == (*image.size[::-1], 3) and out.pixels.dtype == np.uint8
    if mode == "I;16":  # 16-bit is scaled down, not clipped to white
        assert np.abs(out.pixels.astype(int) - 40000 * 255 // 65535).max() <= 1
        return
    # the colours the image holds, in RGB: red (or its grey) in the square, white around it
    square, ground = (np.array(image.convert("RGB").getpixel(xy)) for xy in ((20, 20), (2, 2)))
    tolerance = 8 if fmt == "JPEG" else 0  # CMYK is stored as JPEG
    assert np.abs(out.pixels[20, 20].astype(int) - square).max() <= tolerance, out.pixels[20, 20]
    assert np.abs(out.pixels[2, 2].astype(int) - ground).max() <= tolerance, out.pixels[2, 2]
    if mode in ("L", "LA"):
        assert square[0] == square[1] == square[2] < 100
    else:
        assert square[0] > 200 and square[1:].max() < 60


def test_alpha_composites_over_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    assert decode(encode(image, "PNG"), BIG).pixels.min() == 255


def test_exif_orientation_is_applied():
    image = red_square(size=(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode(encode(image, "JPEG", exif=exif, quality=95), BIG)
    assert (out.width, out.height) == (40, 60) and out.pixels.shape == (60, 40, 3)


def test_jpeg_draft_decodes_fewer_pixels_but_enough():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), np.uint8))
    data = encode(photo, "JPEG")
    out = decode(data, BIG, min_short_side=256)
    assert (out.width, out.height) == (1600, 1200)  # the original size is still reported
    assert 256 <= min(out.pixels.shape[:2]) < 600  # decoded at 1/2 or 1/4 scale, not full
    assert decode(data, BIG).pixels.shape == (1200, 1600, 3)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(ImageError) as e:
        decode(png_header(100_000, 100_000), max_pixels=40_000_000)
    assert e.value.code == "image_too_large" and "10000.0 megapixels" in str(e.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encode(red_square(), "JPEG")[:200]],
    ids=["empty", "garbage", "truncated"],
)
def test_undecodable_is_invalid_image(data):
    with pytest.raises(ImageError) as e:
        decode(data, BIG)
    assert e.value.code == "invalid_image"


def _exif_rotated_jpeg(orientation: int) -> tuple[bytes, Image.Image]:
    image = red_square(size=(60, 40))
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes()), image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_chw_turns_a_tensor_as_pillow_turns_the_image(orientation):
    """The GPU decode path turns nvJPEG's stored pixels upright with `orient_chw`."""
    import torch

    from models.images import orient_chw

    data, _ = _exif_rotated_jpeg(orientation)
    upright = decode(data, BIG).pixels
    stored = torch.from_numpy(decode(data, BIG, orient=False).pixels).permute(2, 0, 1)
    turned = orient_chw(stored, orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(turned, upright)


def test_training_reads_the_pixels_the_service_decodes(tmp_path):
    """One decoder: a dataset image (EXIF-rotated, with alpha) becomes the same pixels in
    training and evaluation as in a request; annotations made on the stored pixels keep them."""
    from models.data import read_tv_image

    data, _ = _exif_rotated_jpeg(6)  # stored 60x40, upright 40x60
    (tmp_path / "r.jpg").write_bytes(data)
    served = decode(data, BIG).pixels
    assert np.array_equal(read_tv_image(tmp_path / "r.jpg").permute(1, 2, 0).numpy(), served)
    stored = read_tv_image(tmp_path / "r.jpg", match_size=(40, 60))  # an annotation 40 high
    assert tuple(stored.shape) == (3, 40, 60)
    rgba = red_square("RGBA")
    rgba.putalpha(0)  # fully transparent: white, as the service composites it
    (tmp_path / "a.png").write_bytes(encode(rgba, "PNG"))
    assert int(read_tv_image(tmp_path / "a.png").min()) == 255


def corrupt_png() -> bytes:
    """A PNG whose zlib stream is damaged mid-way (its header is fine)."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(pixels), "PNG"))
    start = data.find(b"IDAT") + 4
    for i in range(start + 200, start + 240):
        data[i] ^= 0x5A
    return bytes(data)


def test_a_corrupt_png_is_refused_not_half_decoded():
    with pytest.raises(ImageError) as e:
        decode(corrupt_png(), BIG)
    assert e.value.code == "invalid_image"


def test_png_exif_orientation_is_applied():
    image = red_square()
    exif = Image.Exif()
    exif[0x0112] = 6  # 90 degrees clockwise
    out = decode(encode(image, "PNG", exif=exif), BIG)
    assert out.pixels.shape == (60, 40, 3) and (out.width, out.height) == (40, 60)


def test_the_classify_preset_does_not_resize_a_whole_strip():
    from models.classification import resize_crop

    strip = torch.arange(40_000, dtype=torch.float32).div(40_000 / 255).to(torch.uint8)
    strip = strip.expand(3, 1, 40_000).contiguous()  # 1 x 40000: a 256 x 10,240,000 resize
    out = resize_crop(strip, 224)
    assert out.shape == (3, 224, 224)
    assert abs(int(out[0, 112, 112]) - 127) <= 2  # the centre of the strip
    # an elongated photo (smooth, as photos are): the centre square gives the same crop
    y, x = torch.meshgrid(torch.arange(90.0), torch.arange(300.0), indexing="ij")
    wide = (127 + 100 * torch.sin(x / 9) * torch.cos(y / 7)).to(torch.uint8).expand(3, 90, 300)
    short = TF.resize(wide, [73], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    out = resize_crop(wide, 64).int()
    left = (short.shape[-1] - 64) // 2  # the same view, give or take the crop's rounding
    diffs = [
        (out - short[..., 4:68, left + d : left + d + 64].int()).abs().float().mean()
        for d in (-1, 0, 1, 2)
    ]
    assert min(diffs) < 2, diffs
