"""A small, easy dataset for the service tests: class = colour (red, green, blue).

Large filled squares and discs on a noisy grey background, written as real files in the three
layouts (ImageFolder, COCO, ADE20K style). Tiny models learn it in a minute on a CPU, which is
what tests of the serving pipeline need: a wrong channel order, a bad resize or a coordinate
mix-up shows up as a wrong answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}
NAMES = sorted(COLOURS)  # ImageFolder's class order


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    grey = rng.integers(60, 180)
    noise = rng.normal(0, 12, (h, w, 1))
    return np.clip(grey + noise, 0, 255).repeat(3, axis=2).astype(np.uint8)


def draw(image: np.ndarray, colour: str, box: tuple[int, int, int, int], disc: bool) -> np.ndarray:
    """Paint a square or a disc filling `box` (x0, y0, x1, y1); returns its (H, W) bool mask."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    if disc:
        cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    else:
        mask = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    image[mask] = COLOURS[colour]
    return mask


def scene(rng: np.random.Generator, size: int, n_objects: int):
    """An image with up to `n_objects` non-overlapping objects; [(colour, box, mask), ...]."""
    image = background(rng, size, size)
    objects = []
    for _ in range(40):
        if len(objects) == n_objects:
            break
        side = int(rng.integers(size // 4, size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_overlap(box, b) for _, b, _ in objects):
            continue
        colour = NAMES[int(rng.integers(3))]
        objects.append((colour, box, draw(image, colour, box, bool(rng.integers(2)))))
    return image, objects


def _overlap(a, b, margin=2) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def write_classify(root: Path, n: int, size: int = 48, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(12, n // 5))):
        for i in range(count):
            colour = NAMES[i % 3]
            image = background(rng, size, size)
            side = int(rng.integers(size // 2, size - 4))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
            draw(image, colour, (x0, y0, x0 + side, y0 + side), bool(rng.integers(2)))
            path = root / split / colour / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)


def write_detect(root: Path, n: int, size: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(NAMES)]
    for split, count in (("train", n), ("val", max(8, n // 5))):
        images, annotations = [], []
        for i in range(count):
            image, objects = scene(rng, size, int(rng.integers(1, 3)))
            name = f"{i:05d}.png"
            path = root / "images" / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for colour, _, mask in objects:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle["counts"] = rle["counts"].decode()
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": NAMES.index(colour) + 1,
                        "bbox": [x, y, w, h],
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": rle,
                    }
                )
        ann = root / "annotations" / f"instances_{split}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        ann.write_text(json.dumps(coco))


def write_segment(root: Path, n: int, size: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "labels.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("\n".join(["background", *NAMES]) + "\n")
    for split, count in (("training", n), ("validation", max(8, n // 5))):
        for i in range(count):
            image, objects = scene(rng, size, int(rng.integers(1, 3)))
            labels = np.zeros((size, size), np.uint8)
            for colour, _, mask in objects:
                labels[mask] = NAMES.index(colour) + 1
            for sub, array in (("images", image), ("annotations", labels)):
                path = root / sub / split / f"{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
