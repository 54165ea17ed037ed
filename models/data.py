"""Datasets for training and evaluation, and a synthetic "shapes" dataset to try them on.

The layouts are the ones people already have (DESIGN section 4): ImageFolder for classification,
COCO for detection, ADE20K style for segmentation. `synth` writes a small dataset in each layout
as real JPEG/PNG files, fully determined by its seed, so that training, evaluation and the service
can be exercised end to end without downloading anything. The readers are torchvision's datasets
wherever they fit, yielding `tv_tensors` so that `torchvision.transforms.v2` pipelines transform
images, boxes and masks together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
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
CIRCLE_POINTS = 32
STAR_INNER_RATIO = 0.45  # inner/outer radius of the 5-pointed star (a regular one is 0.38)
MAX_OBJECTS = 4
MAX_BOX_IOU = 0.3
MIN_CONTRAST = 100.0  # RGB distance between a shape's colour and the background under it

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
    """One drawn object: its class, its polygon (flat COCO `[x0, y0, x1, y1, ...]`), the pixels it
    covers (rasterised from that polygon, so the label and the picture agree exactly) and the
    flat colour it was painted with."""

    kind: str
    polygon: list[float]
    mask: np.ndarray  # (H, W) bool
    colour: tuple[int, int, int]

    @property
    def class_id(self) -> int:
        """1-based: the COCO category id and the segmentation class id (0 is background)."""
        return CLASSES.index(self.kind) + 1

    @property
    def bbox(self) -> list[int]:
        """COCO `[x, y, w, h]`, the tight box of the mask's pixels."""
        return _mask_box(self.mask)


def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    """The outline of a shape of circumradius `radius`, as a flat COCO polygon.

    Coordinates are rounded to 1/100 pixel, the precision written to JSON, so rasterising the
    returned polygon and rasterising the one read back from the annotation file give the same
    pixels.
    """
    if kind == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, radius, radius * STAR_INNER_RATIO)
        t = angle + k * np.pi / 5
    else:
        n = {"circle": CIRCLE_POINTS, "square": 4, "triangle": 3}[kind]
        r = np.full(n, radius)
        t = angle + np.arange(n) * 2 * np.pi / n
    xy = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).reshape(-1)
    return [round(float(v), 2) for v in xy]


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


def _box_iou(a: list[int], b: list[int]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _background(rng: np.random.Generator, size: int, plain: bool = False) -> np.ndarray:
    """A textured (H, W, 3) uint8 background: a low-frequency colour gradient, pixel noise and a
    few random lines, so that shapes have to be told from clutter rather than from a flat field.

    `plain` gives one flat colour instead: the easy variant that trains in seconds (smoke tests).
    """
    if plain:
        return np.full((size, size, 3), rng.integers(30, 225, 3), dtype=np.uint8)
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
    """Fill the polygon's pixels with one flat colour that stands out from what is under it."""
    under = image[mask].astype(np.float32).mean(axis=0)
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    else:
        colour = 255 - np.round(under).astype(np.int64)
    image[mask] = colour
    return Shape(kind, polygon, mask, (int(colour[0]), int(colour[1]), int(colour[2])))


def render_single(
    rng: np.random.Generator, size: int, kind: str, plain: bool = False
) -> tuple[np.ndarray, Shape]:
    """A classification image: one large shape of class `kind`, near the centre, on clutter."""
    image = _background(rng, size, plain)
    radius = rng.uniform(0.28, 0.45) * size
    jitter = min(size / 2 - radius - 1, 0.15 * size)
    cx, cy = size / 2 + rng.uniform(-jitter, jitter, 2)
    polygon = shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi))
    return image, _paint(rng, image, kind, polygon, polygon_mask(polygon, size, size))


def render_scene(
    rng: np.random.Generator, size: int, plain: bool = False
) -> tuple[np.ndarray, list[Shape]]:
    """A detection/segmentation image: 1-4 shapes of random classes, sizes and places.

    Placements whose pixels touch an earlier object's, or whose box overlaps one by IoU > 0.3,
    are drawn again (up to 30 times, else the object is dropped), so every object is wholly
    visible and its mask needs no occlusion bookkeeping.
    """
    image = _background(rng, size, plain)
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        for _attempt in range(30):
            radius = rng.uniform(0.08, 0.2) * size
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            polygon = shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi))
            mask = polygon_mask(polygon, size, size)
            box = _mask_box(mask)
            if all(
                not (mask & s.mask).any() and _box_iou(box, s.bbox) <= MAX_BOX_IOU for s in shapes
            ):
                shapes.append(_paint(rng, image, kind, polygon, mask))
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
    Image.fromarray(image, "RGB").save(path, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")


def _write_classify(
    out: Path, split: int, n: int, seed: int, size: int, plain: bool
) -> dict[str, int]:
    name = SPLITS["classify"][split]
    for i in range(n):
        kind = CLASSES[i % len(CLASSES)]  # classes take turns: balanced to within one image
        image, _ = render_single(image_rng(seed, "classify", split, i), size, kind, plain)
        _save_jpeg(image, out / name / kind / f"{i:06d}.jpg")
    return {"images": n, "objects": n}


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
                    "segmentation": [s.polygon],
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


def read_image(
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
    loader = partial(read_image, min_short_side=min_short_side) if min_short_side else read_image
    return datasets.ImageFolder(str(Path(root) / split), transform=transform, loader=loader)


class _CocoImages(datasets.CocoDetection):
    """CocoDetection that decodes with torchvision into a `tv_tensors.Image`, not a PIL image."""

    def _load_image(self, id: int) -> tv_tensors.Image:
        info = self.coco.loadImgs(id)[0]
        size = (info["height"], info["width"]) if "height" in info and "width" in info else None
        return read_image(Path(self.root) / info["file_name"], size)


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
        image = read_image(self.images[index], tuple(classes.shape))
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
