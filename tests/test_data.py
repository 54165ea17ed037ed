"""Synthetic shapes datasets and the dataset readers: layouts, exact labels, tv_tensors output."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2

from models.data import (
    CLASSES,
    MAX_OBJECTS,
    MIN_VISIBLE,
    SUPERSAMPLE,
    classification_dataset,
    detection_dataset,
    image_rng,
    label_map,
    polygon_mask,
    read_labels,
    render_scene,
    render_single,
    segmentation_dataset,
    shape_polygon,
    single_image,
    synth,
)
from service.cli import main

N = 8  # training images; validation gets the minimum, 20


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One small dataset per task, seed 0."""
    base = tmp_path_factory.mktemp("shapes")
    for task in ("classify", "detect", "segment"):
        synth(task, base / task, n=N, seed=0)
    return base


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def jpeg(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float32)


def close(decoded, image):
    """A decoded JPEG is the drawn image up to compression: about equal 8x8 block means (JPEG
    keeps the low frequencies; it drops much of the pixel noise). Another image is ~40 away."""
    a, b = (x.reshape(-1, 8, x.shape[1] // 8, 8, 3).mean(axis=(1, 3)) for x in (decoded, image))
    return np.abs(a - b).mean() < 2


def erode(mask):
    """A bool mask less its border pixels: JPEG blurs colours across edges."""
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def tight_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_synth_is_deterministic(roots, tmp_path, task):
    expected = files(roots / task)
    synth(task, tmp_path / "again", n=N, seed=0)
    assert files(tmp_path / "again") == expected
    synth(task, tmp_path / "other", n=N, seed=1)
    other = files(tmp_path / "other")
    assert other.keys() == expected.keys()
    differ = [k for k in expected if k.suffix == ".jpg" and other.get(k) != expected[k]]
    assert len(differ) == sum(k.suffix == ".jpg" for k in expected)


def test_synth_refuses_a_non_empty_directory_and_bad_arguments(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        synth("classify", tmp_path, n=4)
    with pytest.raises(ValueError, match="unknown task"):
        synth("colorize", tmp_path / "new", n=4)
    assert not (tmp_path / "new").exists()


def test_shapes_are_drawn_exactly_where_their_masks_are():
    for i in range(20):
        image, shapes = render_scene(image_rng(0, "detect", 0, i), 128)
        assert 1 <= len(shapes) <= MAX_OBJECTS
        for k, s in enumerate(shapes):
            assert (image[s.mask] == s.colour).all()
            whole = polygon_mask(s.polygon, 128, 128)
            if s.occluded:  # what a later shape left in view: part of its polygon, most of it
                assert (s.mask & ~whole).sum() == 0
                assert MIN_VISIBLE * whole.sum() <= s.mask.sum() < whole.sum()
            else:
                assert np.array_equal(s.mask, whole)
            for other in shapes[k + 1 :]:
                assert not (s.mask & other.mask).any()
    image, shape = render_single(np.random.default_rng(0), 64, "star")
    assert (image[shape.mask] == shape.colour).all() and shape.mask.sum() > 50
    assert len(shape_polygon("circle", 10, 10, 5, 0)) == 64
    assert len(shape_polygon("star", 10, 10, 5, 0)) == 20


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return max(np.ptp(xs), np.ptp(ys)) + 1


def test_the_generator_covers_what_people_draw():
    """Grounds flat and not; the page's colours; shapes upright and turned, from a tenth of
    the frame to filling it; scenes of one to five shapes, some overlapping."""
    singles = [
        render_single(image_rng(0, "classify", 0, i), 64, CLASSES[i % 4]) for i in range(200)
    ]
    scenes = [render_scene(image_rng(0, "detect", 0, i), 128) for i in range(200)]
    flat = [len(np.unique(image[~s.mask], axis=0)) == 1 for image, s in singles]
    assert 0.1 < np.mean(flat) < 0.5  # a quarter of the grounds
    colours = {s.colour for _, shapes in scenes for s in shapes} | {s.colour for _, s in singles}
    assert {(220, 30, 30), (30, 200, 40), (30, 60, 230)} <= colours  # the page's
    extents = [_extent(s.mask) / 64 for _, s in singles]
    assert min(extents) < 0.3 and max(extents) > 0.95
    scene_extents = [_extent(s.mask) / 128 for _, shapes in scenes for s in shapes]
    assert min(scene_extents) < 0.12 and max(scene_extents) > 0.85
    counts = [len(shapes) for _, shapes in scenes]
    assert set(counts) == set(range(1, MAX_OBJECTS + 1))
    assert 0.05 < np.mean([any(s.occluded for s in shapes) for _, shapes in scenes]) < 0.6
    # an upright square fills its box; a turned one, half of it
    fill = [s.mask.sum() / np.prod(s.bbox[2:]) for _, s in singles if s.kind == "square"]
    assert 0.15 < np.mean(np.array(fill) > 0.97) < 0.6


def test_classify_layout_is_an_image_folder(roots):
    train = classification_dataset(roots / "classify", "train")
    val = classification_dataset(roots / "classify", "val")
    assert train.classes == sorted(CLASSES)
    assert len(train) == N and len(val) == 20
    assert np.bincount(train.targets).tolist() == [N // 4] * 4
    image, target = train[0]
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert train.classes[target] == train.samples[0][0].split("/")[-2]


def test_classify_images_show_their_class(roots):
    """A classification file is its shape drawn SUPERSAMPLE times larger and shrunk: the pixels
    well inside the shape (the resize blends two of them at its edge) have its colour."""
    for path in sorted((roots / "classify" / "train").rglob("*.jpg")):
        i, kind = int(path.stem), path.parent.name
        image = single_image(image_rng(0, "classify", 0, i), 64, kind)
        _, shape = render_single(image_rng(0, "classify", 0, i), 64 * SUPERSAMPLE, kind)
        decoded = jpeg(path)
        assert close(decoded, image)
        whole = shape.mask.reshape(64, SUPERSAMPLE, 64, SUPERSAMPLE).all(axis=(1, 3))
        interior = erode(erode(whole))
        assert interior.sum() >= 4
        inside = decoded[interior].mean(axis=0)
        assert np.abs(inside - shape.colour).max() < 12


def test_coco_annotations_match_the_drawn_objects(roots):
    root = roots / "detect"
    for split, index in (("train", 0), ("val", 1)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(CLASSES)
        assert len(coco.getImgIds()) == (N if split == "train" else 20)
        for img in coco.loadImgs(coco.getImgIds()):
            image, shapes = render_scene(image_rng(0, "detect", index, img["id"] - 1), 128)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert [a["category_id"] for a in anns] == [s.class_id for s in shapes]
            decoded = jpeg(root / "images" / split / img["file_name"])
            assert close(decoded, image)
            for ann, shape in zip(anns, shapes, strict=True):
                mask = coco.annToMask(ann).astype(bool)
                assert np.array_equal(mask, shape.mask)
                assert (image[mask] == shape.colour).all()
                inside = erode(mask)
                if inside.sum() >= 150:  # JPEG's halved chroma blurs a small shape's colours
                    assert np.abs(decoded[inside].mean(axis=0) - shape.colour).max() < 12
                assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(mask)
                assert [x, y, x + w - 1, y + h - 1] == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_segment_label_maps_match_the_drawn_objects(roots):
    root = roots / "segment"
    labels = read_labels(root)
    assert labels == ["background", *CLASSES]
    for index, split in enumerate(("training", "validation")):
        pngs = sorted((root / "annotations" / split).glob("*.png"))
        assert len(pngs) == (N if split == "training" else 20)
        for png in pngs:
            with Image.open(png) as im:
                assert im.mode == "L"
                classes = np.asarray(im)
            assert classes.max() < len(labels)
            image, shapes = render_scene(image_rng(0, "segment", index, int(png.stem)), 128)
            assert np.array_equal(classes, label_map(shapes, 128))
            for s in shapes:
                assert (image[s.mask] == s.colour).all()
            decoded = jpeg(root / "images" / split / f"{png.stem}.jpg")
            assert close(decoded, image)


def check_detection_sample(image, target, size=128):
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8 and image.shape == (3, size, size)
    boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (size, size)
    assert boxes.dtype == torch.float32
    assert isinstance(masks, tv_tensors.Mask) and masks.shape[1:] == (size, size)
    assert labels.dtype == torch.int64
    assert boxes.shape == (len(labels), 4) and masks.shape[0] == len(labels)
    assert isinstance(target["image_id"], int)
    for box, mask in zip(boxes, masks, strict=True):
        assert box.tolist() == tight_box(mask)


def test_detection_dataset_gives_tv_tensors_and_flips_boxes_with_masks(roots):
    plain = detection_dataset(roots / "detect", "train")
    flipped = detection_dataset(roots / "detect", "train", v2.RandomHorizontalFlip(p=1.0))
    assert plain.category_names == list(CLASSES) and isinstance(plain.coco, COCO)
    assert len(plain) == N
    assert torch.equal(pickle.loads(pickle.dumps(flipped))[0][1]["masks"], flipped[0][1]["masks"])
    for i in range(3):
        image, target = plain[i]
        check_detection_sample(image, target)
        assert 1 <= len(target["labels"]) <= MAX_OBJECTS and target["image_id"] == i + 1
        assert set(target["labels"].tolist()) <= {1, 2, 3, 4}
        f_image, f_target = flipped[i]
        check_detection_sample(f_image, f_target)
        assert torch.equal(f_image, image.flip(-1))
        assert torch.equal(f_target["masks"], target["masks"].flip(-1))
        assert torch.equal(f_target["labels"], target["labels"])


def test_detection_dataset_handles_images_without_annotations(roots, tmp_path):
    ann_file = roots / "detect" / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["images"].append({"id": 999, "file_name": "000000.jpg", "width": 128, "height": 128})
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    (ann_dir / "instances_val.json").write_text(json.dumps(coco))
    (tmp_path / "images").symlink_to(roots / "detect" / "images")
    ds = detection_dataset(tmp_path, "val", v2.Compose([v2.RandomHorizontalFlip(p=1.0)]))
    image, target = ds[len(ds) - 1]
    check_detection_sample(image, target)
    assert target["image_id"] == 999
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 128, 128)


def test_segmentation_dataset_gives_tv_tensors(roots):
    root = roots / "segment"
    ds = segmentation_dataset(root, "training")
    assert ds.labels == ["background", *CLASSES] and len(ds) == N
    assert len(segmentation_dataset(root, "val")) == 20  # train/val name the ADE20K splits
    image, mask = ds[0]
    assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 128)
    assert mask.dtype == torch.int64 and mask.shape == (128, 128)
    expected = np.asarray(Image.open(root / "annotations" / "training" / "000000.png"))
    assert np.array_equal(mask.numpy(), expected)
    flipped = segmentation_dataset(root, "training", v2.RandomHorizontalFlip(p=1.0))
    f_image, f_mask = flipped[0]
    assert isinstance(f_mask, tv_tensors.Mask)
    assert torch.equal(f_mask, mask.flip(-1)) and torch.equal(f_image, image.flip(-1))


def test_cli_data_synth(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "synth", "classify", "--out", str(out), "--n", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "train" in printed
    assert len(list(out.rglob("*.jpg"))) == 4 + 20
    assert main(["data", "synth", "classify", "--out", str(out)]) == 2  # not empty: one line
    assert "not an empty directory" in capsys.readouterr().err
