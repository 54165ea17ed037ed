"""Datasets for training and evaluation, and a synthetic "shapes" dataset to try them on.

The layouts are the ones people already have (docs/training.md): ImageFolder for classification,
COCO for detection, ADE20K style for segmentation. `synth` writes a small dataset in each layout
as real JPEG/PNG files, fully determined by its seed, so that training, evaluation and the service
can be exercised end to end without downloading anything. The readers are torchvision's datasets
wherever they fit, yielding `tv_tensors` so that `torchvision.transforms.v2` pipelines transform
images, boxes and masks together.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torchvision import datasets, tv_tensors

from . import images
from .labels import read_labels_file

CLASSES = ("circle", "square", "triangle", "star")
TASKS = ("classify", "detect", "segment")
DEFAULT_IMAGE_SIZE = {"classify": 64, "detect": 128, "segment": 128}
MIN_VAL_IMAGES = 20
JPEG_QUALITY = 90
SUPERSAMPLE = 4  # a classification image is drawn this many times larger, then shrunk
PARALLEL_FROM = 2000  # classification images: from this many, drawn by a process per core
CIRCLE_POINTS = 32
STAR_INNER_RATIO = 0.45  # inner/outer radius of the 5-pointed star (a regular one is 0.38)
MAX_OBJECTS = 5
MIN_VISIBLE = 0.75  # a shape drawn over another leaves at least this much of that one in view
MIN_CONTRAST = 100.0  # RGB distance between a shape's colour and the background under it
# Plain colours people draw with, the page's sample colours among them: a shape takes one of
# these half the time, otherwise any colour that stands out from what is under it.
NAMED_COLOURS = (
    (220, 30, 30),
    (30, 200, 40),
    (30, 60, 230),
    (250, 200, 0),
    (255, 128, 0),
    (150, 40, 200),
    (0, 0, 0),
    (255, 255, 255),
    (128, 128, 128),
    (0, 180, 200),
    (240, 80, 160),
    (120, 70, 20),
)
GROUNDS = ("flat", "noise", "split", "gradient", "textured")
# The angle at which each shape stands as people draw it (a square axis-aligned, a triangle
# and a star on their base); a third of the shapes are drawn so, the rest at any angle.
UPRIGHT = {"circle": 0.0, "square": np.pi / 4, "triangle": -np.pi / 2, "star": -np.pi / 2}
UPRIGHT_FRACTION = 1 / 3
MAX_STRETCH = 1.3  # a shape may be drawn this much wider than tall, or taller than wide
# A classification image's shape spans this much of the frame (its longer side), anywhere in
# it; but half of them are large and near the centre. Those are what a model from scratch
# learns shapes from first: trained on the spread alone, it stays at chance for thousands of
# steps.
SINGLE_EXTENT = (0.25, 1.0)
CENTRED_FRACTION = 0.5
CENTRED_EXTENT = (0.55, 0.9)
CENTRED_JITTER = 0.3  # of the room there is to move: 0 = centred, 1 = anywhere in the frame
# A scene's shapes span from a tenth of the frame; the fewer there are, the larger they may be.
SCENE_MIN_EXTENT = 0.1
SCENE_MAX_EXTENT = (0.95, 0.7, 0.5)  # for one, two, three or more shapes

# the split directory names of each layout, train first
SPLITS = {
    "classify": ("train", "val"),
    "detect": ("train", "val"),
    "segment": ("training", "validation"),
}
_ADE_SPLITS = {"train": "training", "val": "validation"}

Transforms = Callable | None


# ---------------------------------------------------------------- shapes: geometry and drawing


@dataclass(frozen=True)
class Shape:
    """One drawn object: its class, its polygon (flat COCO `[x0, y0, x1, y1, ...]`), the pixels
    of it in view (rasterised from that polygon, so the label and the picture agree exactly,
    less what a later shape covers) and the flat colour it was painted with."""

    kind: str
    polygon: list[float]
    mask: np.ndarray  # (H, W) bool
    colour: tuple[int, int, int]
    occluded: bool = False  # a later shape covers part of it: `mask` is less than the polygon's

    @property
    def class_id(self) -> int:
        """1-based: the COCO category id and the segmentation class id (0 is background)."""
        return CLASSES.index(self.kind) + 1

    @property
    def bbox(self) -> list[int]:
        """COCO `[x, y, w, h]`, the tight box of the mask's pixels."""
        return _mask_box(self.mask)


def shape_polygon(
    kind: str, cx: float, cy: float, radius: float, angle: float, stretch: float = 1.0
) -> list[float]:
    """The outline of a shape of circumradius `radius`, as a flat COCO polygon; `stretch` > 1
    widens it (and < 1 makes it taller) by that ratio, keeping its area.

    Coordinates are rounded to 1/100 pixel, the precision written to JSON, so rasterising the
    returned polygon and rasterising the one read back from the annotation file give the same
    pixels.
    """
    x, y = _outline(kind, angle, stretch)
    xy = np.stack([cx + radius * x, cy + radius * y], axis=1).reshape(-1)
    return [round(float(v), 2) for v in xy]


def _outline(kind: str, angle: float, stretch: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The unit-circumradius outline of a shape turned by `angle` and stretched, centred on 0."""
    if kind == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, STAR_INNER_RATIO)
        t = angle + k * np.pi / 5
    else:
        n = {"circle": CIRCLE_POINTS, "square": 4, "triangle": 3}[kind]
        r = np.ones(n)
        t = angle + np.arange(n) * 2 * np.pi / n
    return r * np.cos(t) * np.sqrt(stretch), r * np.sin(t) / np.sqrt(stretch)


def polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """The (H, W) bool pixels of a polygon, rasterised by pycocotools.

    The same rasteriser as `COCO.annToMask` and COCO evaluation, so the drawn object, its label
    map and its annotation cover exactly the same pixels.
    """
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return mask_utils.decode(rle).astype(bool)


def _mask_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _background(rng: np.random.Generator, size: int, plain: bool = False) -> np.ndarray:
    """An (H, W, 3) uint8 ground of one of five kinds, each as likely: a flat colour (often
    near white or black), grey with pixel noise, two flat colours either side of a line, a
    linear gradient between two colours, or clutter (a low-frequency colour field, pixel noise
    and a few random lines).

    `plain` gives one flat mid colour instead: the easy variant that trains in seconds (smoke
    tests).
    """
    if plain:
        return np.full((size, size, 3), rng.integers(30, 225, 3), dtype=np.uint8)
    ground = GROUNDS[int(rng.integers(len(GROUNDS)))]
    if ground == "flat":
        tone = rng.choice([rng.integers(215, 256), rng.integers(0, 45), 128]) + np.zeros(3)
        colour = rng.integers(0, 256, 3) if rng.random() < 0.3 else tone
        return np.full((size, size, 3), colour, dtype=np.uint8)
    if ground == "noise":
        noisy = rng.uniform(40, 215) + rng.normal(0.0, rng.uniform(4, 24), (size, size, 1))
        return np.clip(noisy, 0, 255).repeat(3, axis=2).astype(np.uint8)
    if ground == "split":  # two flat colours either side of a line: a horizon, a table's edge
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:size, :size] - size / 2
        side = (np.cos(t) * xx + np.sin(t) * yy) > rng.uniform(-0.3, 0.3) * size
        a, b = rng.integers(0, 256, (2, 3))
        return np.where(side[..., None], a, b).astype(np.uint8)
    if ground == "gradient":
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:size, :size] / (size - 1)
        ramp = (np.cos(t) * xx + np.sin(t) * yy)[..., None]
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        a, b = rng.uniform(0, 255, (2, 3))
        return (a + (b - a) * ramp).astype(np.uint8)
    grid = rng.uniform(30, 225, size=(3, 3, 3)).astype(np.uint8)
    base = Image.fromarray(grid, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    noisy = np.asarray(base, np.float32) + rng.normal(0.0, 10.0, size=(size, size, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        xy = [float(v) for v in rng.uniform(0, size, 4)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(xy, fill=colour, width=int(rng.integers(1, 3)))
    return np.array(image)


def _paint(
    rng: np.random.Generator, image: np.ndarray, kind: str, polygon: list[float], mask: np.ndarray
) -> Shape:
    """Fill the polygon's pixels with one flat colour that stands out from what is under it:
    half the time a named colour (when one does), otherwise a random one."""
    under = image[mask].astype(np.float32).mean(axis=0)
    named = [c for c in NAMED_COLOURS if np.linalg.norm(np.subtract(c, under)) >= MIN_CONTRAST]
    if named and rng.random() < 0.5:
        colour = np.array(named[int(rng.integers(len(named)))])
    else:
        tries = (rng.integers(0, 256, 3) for _ in range(20))
        colour = next((c for c in tries if np.linalg.norm(c - under) >= MIN_CONTRAST), None)
        if colour is None:
            colour = 255 - np.round(under).astype(np.int64)
    image[mask] = colour
    return Shape(kind, polygon, mask, (int(colour[0]), int(colour[1]), int(colour[2])))


def _place(
    rng: np.random.Generator,
    size: int,
    kind: str,
    extent: tuple[float, float],
    centre_jitter: float = 1.0,
) -> list[float]:
    """A random polygon of `kind` whose longer side spans `extent` of the frame, inside it:
    upright a third of the time, otherwise at any angle; stretched up to `MAX_STRETCH`."""
    angle = UPRIGHT[kind] if rng.random() < UPRIGHT_FRACTION else rng.uniform(0, 2 * np.pi)
    stretch = float(np.exp(rng.uniform(-1, 1) * np.log(MAX_STRETCH)))
    x, y = _outline(kind, angle, stretch)
    span = max(np.ptp(x), np.ptp(y))  # of the unit-circumradius outline
    radius = rng.uniform(*extent) * (size - 2) / span
    # the range of centres that keeps the outline inside the frame, narrowed by the jitter
    lo = np.array([-x.min(), -y.min()]) * radius + 1
    hi = size - 1 - np.array([x.max(), y.max()]) * radius
    mid = (lo + hi) / 2
    cx, cy = mid + (rng.uniform(0, 1, 2) - 0.5) * np.maximum(hi - lo, 0) * centre_jitter
    return shape_polygon(kind, cx, cy, radius, angle, stretch)


def render_single(
    rng: np.random.Generator, size: int, kind: str, plain: bool = False
) -> tuple[np.ndarray, Shape]:
    """A classification image: one shape of class `kind` spanning a quarter of the frame to
    all of it, anywhere in it, on any ground."""
    image = _background(rng, size, plain)
    if rng.random() < CENTRED_FRACTION:
        polygon = _place(rng, size, kind, CENTRED_EXTENT, CENTRED_JITTER)
    else:
        polygon = _place(rng, size, kind, SINGLE_EXTENT)
    return image, _paint(rng, image, kind, polygon, polygon_mask(polygon, size, size))


def render_scene(
    rng: np.random.Generator, size: int, plain: bool = False
) -> tuple[np.ndarray, list[Shape]]:
    """A detection/segmentation image: 1-5 shapes of random classes, sizes and places; one
    alone may fill most of the frame, several are smaller.

    A shape may be drawn over earlier ones as long as each keeps `MIN_VISIBLE` of its pixels
    in view (a placement that would hide more is drawn again, up to 30 times, else the shape
    is dropped); the earlier shapes' masks then hold only what is still in view.
    """
    image = _background(rng, size, plain)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    extent = (SCENE_MIN_EXTENT, SCENE_MAX_EXTENT[min(count, len(SCENE_MAX_EXTENT)) - 1])
    shapes: list[Shape] = []
    areas: list[int] = []  # of each shape's whole polygon
    for _ in range(count):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        for _attempt in range(30):
            polygon = _place(rng, size, kind, extent)
            mask = polygon_mask(polygon, size, size)
            in_view = [s.mask & ~mask for s in shapes]
            if all(v.sum() >= MIN_VISIBLE * a for v, a in zip(in_view, areas, strict=True)):
                shapes = [
                    replace(s, mask=v, occluded=True) if (s.mask & mask).any() else s
                    for s, v in zip(shapes, in_view, strict=True)
                ]
                shapes.append(_paint(rng, image, kind, polygon, mask))
                areas.append(int(mask.sum()))
                break
    return image, shapes


def label_map(shapes: list[Shape], size: int) -> np.ndarray:
    """The (H, W) uint8 class-id map of drawn shapes (0 = background), painted in drawing order."""
    out = np.zeros((size, size), np.uint8)
    for s in shapes:
        out[s.mask] = s.class_id
    return out


# ---------------------------------------------------------------- synth: writing the layouts


def image_rng(seed: int, task: str, split: int, index: int) -> np.random.Generator:
    """The generator of one image: each image depends only on (seed, task, split, index), so a
    dataset's first images are the same whatever `n` is."""
    return np.random.default_rng([seed, TASKS.index(task), split, index])


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Full-resolution colour: halved chroma smears a small image's shapes into their ground,
    # which the photos a classifier is served, resized from far larger, do not show.
    Image.fromarray(image, "RGB").save(path, "JPEG", quality=JPEG_QUALITY, subsampling="4:4:4")


def single_image(rng: np.random.Generator, size: int, kind: str, plain: bool = False) -> np.ndarray:
    """A classification image as written: drawn at `SUPERSAMPLE` times `size` and shrunk
    (antialiased), so its shapes have the soft edges of a served photo shrunk to the model's
    input, not the jagged ones of a polygon rasterised at a few dozen pixels."""
    image, _ = render_single(rng, size * SUPERSAMPLE, kind, plain)
    small = Image.fromarray(image, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(small)


def _write_classify(
    out: Path, split: int, n: int, seed: int, size: int, plain: bool
) -> dict[str, int]:
    write = partial(_write_singles, out / SPLITS["classify"][split], split, seed, size, plain)
    workers = min(os.cpu_count() or 1, 8) if n >= PARALLEL_FROM else 1
    if workers == 1:
        write(range(n))
    else:  # each image depends only on its index: the same files from any number of workers
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(write, [range(w, n, workers) for w in range(workers)]))
    return {"images": n, "objects": n}


def _write_singles(
    folder: Path, split: int, seed: int, size: int, plain: bool, indices: range
) -> None:
    for i in indices:
        kind = CLASSES[i % len(CLASSES)]  # classes take turns: balanced to within one image
        image = single_image(image_rng(seed, "classify", split, i), size, kind, plain)
        _save_jpeg(image, folder / kind / f"{i:06d}.jpg")


def _write_detect(
    out: Path, split: int, n: int, seed: int, size: int, plain: bool
) -> dict[str, int]:
    name = SPLITS["detect"][split]
    images, annotations = [], []
    for i in range(n):
        image, shapes = render_scene(image_rng(seed, "detect", split, i), size, plain)
        file_name = f"{i:06d}.jpg"
        _save_jpeg(image, out / "images" / name / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for s in shapes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": s.class_id,
                    "bbox": [float(v) for v in s.bbox],
                    "area": float(s.mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(s.mask) if s.occluded else [s.polygon],
                }
            )
    coco = {
        "info": {"description": f"convnext-serve synthetic shapes, seed {seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)
        ],
    }
    ann_file = out / "annotations" / f"instances_{name}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco), encoding="utf-8")
    return {"images": n, "objects": len(annotations)}


def _rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a bool mask, as JSON holds it: what is left in view of an
    occluded shape is no polygon."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_segment(
    out: Path, split: int, n: int, seed: int, size: int, plain: bool
) -> dict[str, int]:
    name = SPLITS["segment"][split]
    objects = 0
    for i in range(n):
        image, shapes = render_scene(image_rng(seed, "segment", split, i), size, plain)
        _save_jpeg(image, out / "images" / name / f"{i:06d}.jpg")
        png = out / "annotations" / name / f"{i:06d}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map(shapes, size), "L").save(png, "PNG")
        objects += len(shapes)
    (out / "labels.txt").write_text("\n".join(["background", *CLASSES]) + "\n", encoding="utf-8")
    return {"images": n, "objects": objects}


_WRITERS = {"classify": _write_classify, "detect": _write_detect, "segment": _write_segment}


def synth(
    task: str,
    out: str | Path,
    n: int = 1000,
    seed: int = 0,
    image_size: int | None = None,
    n_val: int | None = None,
    plain: bool = False,
) -> dict[str, dict[str, int]]:
    """Write a synthetic shapes dataset for `task` under `out` (which must be empty or absent).

    `n` training images (classify: balanced over the classes) and `n_val` validation images
    (default `max(n // 5, 20)`), at `image_size` (default 64 for classify, 128 otherwise). The
    same seed gives byte-identical files. `plain` draws on flat backgrounds instead of clutter
    (an easy variant for smoke tests). Returns `{split directory: {"images", "objects"}}`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    size = DEFAULT_IMAGE_SIZE[task] if image_size is None else image_size
    n_val = max(n // 5, MIN_VAL_IMAGES) if n_val is None else n_val
    if n < 1 or n_val < 1 or seed < 0 or size < 32:
        raise ValueError(
            f"need n >= 1, n_val >= 1, seed >= 0, image_size >= 32, got {n}, "
            f"{n_val}, {seed}, {size}"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    write = _WRITERS[task]
    return {
        SPLITS[task][split]: write(out, split, count, seed, size, plain)
        for split, count in enumerate((n, n_val))
    }


# ---------------------------------------------------------------- datasets for training and eval


def read_tv_image(
    path: str | Path, match_size: tuple[int, int] | None = None, min_short_side: int | None = None
) -> tv_tensors.Image:
    """An image file as a (3, H, W) uint8 RGB `tv_tensors.Image`, decoded by the service's own
    decoder (`images.read_image`: EXIF orientation, alpha over white, 16-bit scaled)."""
    return tv_tensors.Image(images.read_image(path, match_size, min_short_side))


def read_label_map(path: str | Path) -> torch.Tensor:
    """A class-id PNG as an (H, W) int64 tensor. Read with Pillow, which keeps palette ("P")
    images' indices as they are (a colour decoder would turn them into colours)."""
    with Image.open(path) as png:
        classes = np.array(png)
    if classes.ndim != 2:
        raise ValueError(f"{path}: a label map must have one channel, got mode {png.mode}")
    return torch.from_numpy(classes.astype(np.int64))


def read_labels(root: str | Path) -> list[str]:
    """The class names of a segmentation dataset: `root/labels.txt`, line i = class id i."""
    return read_labels_file(Path(root) / "labels.txt")


def classification_dataset(
    root: str | Path, split: str, transform: Transforms = None, min_short_side: int | None = None
) -> datasets.ImageFolder:
    """torchvision's ImageFolder over `root/split` ("train" or "val") yielding
    (`tv_tensors.Image` uint8, class index).

    The class names are `.classes`: the sub-directory names sorted, ImageFolder's convention, so
    the class index follows that order.
    """
    loader = read_tv_image
    if min_short_side:
        loader = partial(read_tv_image, min_short_side=min_short_side)
    return datasets.ImageFolder(str(Path(root) / split), transform=transform, loader=loader)


class _CocoImages(datasets.CocoDetection):
    """CocoDetection that decodes with torchvision into a `tv_tensors.Image`, not a PIL image."""

    def _load_image(self, id: int) -> tv_tensors.Image:
        info = self.coco.loadImgs(id)[0]
        size = (info["height"], info["width"]) if "height" in info and "width" in info else None
        return read_tv_image(Path(self.root) / info["file_name"], size)


class CocoInstances(torch.utils.data.Dataset):
    """A COCO split as (`tv_tensors.Image` uint8, target) with target keys `boxes`
    (`BoundingBoxes` XYXY), `labels` (int64 category ids), `masks` (`Mask` uint8 (N, H, W)) and
    `image_id`.

    torchvision's transforms-v2 wrapper of CocoDetection does the conversion; this adds the
    empty target it leaves out for images without annotations, so a batch never misses a key,
    and makes boxes float32 whatever the JSON holds (torchvision's detectors refuse others).
    """

    TARGET_KEYS = ("boxes", "labels", "masks", "image_id")

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transforms: Transforms = None):
        coco_images = _CocoImages(str(image_dir), str(ann_file))
        self._wrapped = datasets.wrap_dataset_for_transforms_v2(
            coco_images, target_keys=self.TARGET_KEYS
        )
        self.coco = coco_images.coco
        self.ids = coco_images.ids
        self.category_ids = sorted(self.coco.cats)
        self.category_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self._wrapped)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image, target = self._wrapped[index]
        if "boxes" in target:  # integer COCO boxes come out int64; the detectors want float
            target["boxes"] = target["boxes"].to(torch.float32)
        else:
            target = _empty_target(image, target["image_id"])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _empty_target(image: torch.Tensor, image_id: int) -> dict:
    h, w = image.shape[-2:]
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.zeros((0, 4)), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(h, w)
        ),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.zeros((0, h, w), dtype=torch.uint8)),
        "image_id": image_id,
    }


def detection_dataset(root: str | Path, split: str, transforms: Transforms = None) -> CocoInstances:
    """The COCO split `root/images/<split>` + `root/annotations/instances_<split>.json`
    ("train" or "val"); `transforms(image, target)` is a transforms-v2 pipeline."""
    root = Path(root)
    return CocoInstances(
        root / "images" / split, root / "annotations" / f"instances_{split}.json", transforms
    )


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class SegmentationFolder(torch.utils.data.Dataset):
    """ADE20K-style pairs `images/<split>/<stem>.jpg` + `annotations/<split>/<stem>.png` as
    (`tv_tensors.Image` uint8 (3, H, W), `tv_tensors.Mask` int64 (H, W) of class ids)."""

    def __init__(self, root: str | Path, split: str, transforms: Transforms = None):
        root = Path(root)
        split = _ADE_SPLITS.get(split, split)
        self.labels = read_labels(root)
        self.images = sorted(
            p for p in (root / "images" / split).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
        )
        self.annotations = [root / "annotations" / split / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.annotations if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} annotation file(s) missing: {missing[0]}, ...")
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        classes = read_label_map(self.annotations[index])
        image = read_tv_image(self.images[index], tuple(classes.shape))
        mask = tv_tensors.Mask(classes)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


def segmentation_dataset(
    root: str | Path, split: str, transforms: Transforms = None
) -> SegmentationFolder:
    """The ADE20K-style split ("training"/"validation", or "train"/"val") of `root`, class names
    in `.labels`; `transforms(image, mask)` is a transforms-v2 pipeline."""
    return SegmentationFolder(root, split, transforms)
