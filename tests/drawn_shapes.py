"""Shapes the demo models never trained on: a held-out test set, drawn apart from `models.data`.

Two parts. The page's samples (`service/page/index.html`, `sample()`), drawn here as the page
draws them: the same sizes, colours and places, and the same grey noise from the same
generator (mulberry32, seeded). And a spread of simple shapes drawn with Pillow's `ImageDraw`
(rectangles, ellipses, regular polygons) on grounds, in colours and in frame shapes of this
module's own, the way a person might draw them. Nothing here calls the training generator, so
a model that only learnt its quirks fails.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import ops

KINDS = ("circle", "square", "triangle", "star")
PAGE_SIZE = (320, 240)  # width, height of the page's sample canvas
PAGE_SEED = 7
# The page's samples: (kind, colour, centre x, centre y, radius); a square's "radius" is half
# its side. The scene sample holds one of each, smaller.
PAGE_SAMPLES = {
    "square": [("square", (220, 30, 30), 160, 120, 70)],
    "disc": [("circle", (30, 200, 40), 160, 120, 75)],
    "triangle": [("triangle", (30, 60, 230), 160, 130, 95)],
    "star": [("star", (250, 170, 0), 160, 125, 95)],
    "scene": [
        ("square", (220, 30, 30), 75, 70, 42),
        ("circle", (30, 200, 40), 235, 70, 45),
        ("triangle", (30, 60, 230), 80, 180, 55),
        ("star", (250, 170, 0), 235, 178, 55),
    ],
}
STAR_INNER = 0.45  # the page's star: inner radius / outer


@dataclass
class Drawn:
    """One test image: its pixels, and each shape's kind and (H, W) bool mask."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    shapes: list[tuple[str, np.ndarray]]

    def png(self) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.image).save(out, "PNG")
        return out.getvalue()


def mulberry32(seed: int):
    """The page's seeded generator: floats in [0, 1), as JavaScript's mulberry32 gives them."""
    state = seed & 0xFFFFFFFF

    def next_float() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & 0xFFFFFFFF
        t = state
        t = _imul(t ^ (t >> 15), t | 1)
        t ^= (t + _imul(t ^ (t >> 7), t | 61)) & 0xFFFFFFFF
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296

    return next_float


def _imul(a: int, b: int) -> int:
    return (a * b) & 0xFFFFFFFF


def _page_ground() -> Image.Image:
    width, height = PAGE_SIZE
    rand = mulberry32(PAGE_SEED)
    noise = [int(np.floor(120 + (rand() - 0.5) * 24 + 0.5)) for _ in range(width * height)]
    grey = np.array(noise, np.uint8).reshape(height, width)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def _outline(kind: str, cx: float, cy: float, r: float, angle: float = -np.pi / 2):
    """The page's polygons: a triangle and a star point up at `angle`, circumradius `r`."""
    if kind == "triangle":
        t = angle + np.arange(3) * 2 * np.pi / 3
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t]
    k = np.arange(10)
    radii = np.where(k % 2 == 0, r, r * STAR_INNER)
    return [
        (cx + q * np.cos(angle + i * np.pi / 5), cy + q * np.sin(angle + i * np.pi / 5))
        for i, q in zip(k, radii, strict=True)
    ]


def _draw(image: Image.Image, kind: str, colour, cx, cy, r, angle=-np.pi / 2) -> np.ndarray:
    """Draw one filled shape on `image`; returns its (H, W) bool mask."""
    mask = Image.new("L", image.size, 0)
    for target, fill in ((ImageDraw.Draw(image), tuple(colour)), (ImageDraw.Draw(mask), 255)):
        if kind == "square":
            target.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
        elif kind == "circle":
            target.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            target.polygon(_outline(kind, cx, cy, r, angle), fill=fill)
    return np.asarray(mask) > 0


def page_sample(name: str) -> Drawn:
    """One of the page's sample images, as its `sample(name)` draws it."""
    image = _page_ground()
    shapes = [
        (kind, _draw(image, kind, colour, cx, cy, r))
        for kind, colour, cx, cy, r in PAGE_SAMPLES[name]
    ]
    return Drawn(f"page {name}", np.asarray(image).copy(), shapes)


# Grounds, colours and frames of this set's own (none of them the training generator's).
FRAMES = ((256, 256), (320, 240), (240, 320), (400, 300))
COLOURS = (
    (200, 20, 60),
    (20, 40, 120),
    (0, 128, 128),
    (255, 215, 0),
    (70, 130, 180),
    (139, 69, 19),
    (34, 139, 34),
    (148, 0, 211),
    (255, 99, 71),
    (25, 25, 25),
)


def _ground(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Paper white, slate, a pastel, two bands, or a soft vignette."""
    kind = int(rng.integers(5))
    if kind == 0:
        fill = np.full((height, width, 3), 250.0) + rng.normal(0, 2, (height, width, 1))
    elif kind == 1:
        fill = np.full((height, width, 3), (47.0, 54.0, 64.0))
    elif kind == 2:
        fill = np.full((height, width, 3), rng.uniform(190, 240, 3))
    elif kind == 3:
        fill = np.full((height, width, 3), rng.uniform(160, 240, 3))
        fill[int(height * rng.uniform(0.3, 0.7)) :] = rng.uniform(60, 140, 3)
    else:
        yy, xx = np.mgrid[:height, :width]
        d = np.hypot(xx - width / 2, yy - height / 2) / np.hypot(width / 2, height / 2)
        fill = (230 - 120 * d)[..., None] * np.ones(3)
    return Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8))


def _contrasting(rng: np.random.Generator, image: Image.Image, box) -> tuple[int, int, int]:
    under = np.asarray(image.crop(box), np.float32).reshape(-1, 3).mean(axis=0)
    far = [c for c in COLOURS if np.linalg.norm(np.subtract(c, under)) >= 100]
    return far[int(rng.integers(len(far)))]


def drawn_shape(rng: np.random.Generator, kind: str, index: int) -> Drawn:
    """One shape of `kind` spanning 30-90% of the frame's short side, anywhere in the frame's
    central square, upright or turned a little (a circle, a square, a triangle on its base, a
    five-pointed star)."""
    width, height = FRAMES[index % len(FRAMES)]
    image = _ground(rng, width, height)
    short = min(width, height)
    r = rng.uniform(0.15, 0.45) * short  # half the extent
    # inside the frame's central square, which a classifier's centre crop keeps
    x0, y0 = (width - short) / 2, (height - short) / 2
    cx = x0 + rng.uniform(r + 2, short - r - 2)
    cy = y0 + rng.uniform(r + 2, short - r - 2)
    angle = -np.pi / 2 + (rng.uniform(-0.3, 0.3) if rng.random() < 0.5 else 0.0)
    if kind == "triangle":  # a triangle's centroid sits below its box's centre
        cy = min(cy + r / 4, height - r / 2 - 2)
    box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    colour = _contrasting(rng, image, box)
    mask = _draw(image, kind, colour, cx, cy, r, angle)
    return Drawn(f"{kind} {index}", np.asarray(image).copy(), [(kind, mask)])


def held_out(per_kind: int = 25, seed: int = 2026) -> list[Drawn]:
    """The page's four one-shape samples, then `per_kind` drawn shapes of each kind."""
    rng = np.random.default_rng(seed)
    samples = [page_sample(name) for name in ("square", "disc", "triangle", "star")]
    drawn = [drawn_shape(rng, kind, i) for i in range(per_kind) for kind in KINDS]
    return samples + drawn


def box_of(mask: np.ndarray) -> list[float]:
    """The (x0, y0, x1, y1) box around a mask's pixels, as the service's boxes are."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def box_iou(a, b) -> float:
    """The IoU of two (x0, y0, x1, y1) boxes."""
    boxes = torch.from_numpy(np.array([a, b], np.float64))
    return float(ops.box_iou(boxes[:1], boxes[1:]))


def drawn_scene(rng: np.random.Generator, index: int, count: int) -> Drawn:
    """`count` shapes of random kinds, 12-25% of the frame's short side across, apart from
    each other (a pipeline's detector finds each, its classifier names each crop)."""
    width, height = FRAMES[index % len(FRAMES)]
    image = _ground(rng, width, height)
    short = min(width, height)
    shapes, placed = [], []
    while len(shapes) < count:
        kind = KINDS[int(rng.integers(len(KINDS)))]
        r = rng.uniform(0.12, 0.25) * short
        cx, cy = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
        if any(np.hypot(cx - x, cy - y) < r + q + 6 for x, y, q in placed):
            continue  # apart: a box of one holds none of another
        placed.append((cx, cy, r))
        box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
        angle = -np.pi / 2 + (rng.uniform(-0.3, 0.3) if rng.random() < 0.5 else 0.0)
        shapes.append((kind, _draw(image, kind, _contrasting(rng, image, box), cx, cy, r, angle)))
    return Drawn(f"scene {index}", np.asarray(image).copy(), shapes)


def held_out_scenes(count: int = 40, seed: int = 2027) -> list[Drawn]:
    """The page's scene sample, then `count` scenes of 2 to 4 shapes."""
    rng = np.random.default_rng(seed)
    scenes = [drawn_scene(rng, i, 2 + i % 3) for i in range(count)]
    return [page_sample("scene"), *scenes]
