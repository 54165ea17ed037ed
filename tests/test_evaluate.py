"""The evaluation maths, against answers known by construction and a second implementation.

These figures go into every checkpoint's provenance and the quality tables, so each is checked
apart from the code that computes it: top-k on logits whose ranks are set by hand, COCO AP
against a reference written here from COCO's definition (101-point interpolated precision,
averaged over IoU 0.5:0.95), the confusion matrix and mIoU against scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import jaccard_score
from torch import nn

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance
from models.data import CLASSES, read_labels, synth
from models.evaluate import (
    coco_ap,
    confusion_matrix,
    evaluate_checkpoint,
    evaluate_classifier,
    evaluate_segmenter,
    segmentation_metrics,
    topk_correct,
)

from .test_dense import RedSegmenter

# ---------------------------------------------------------------- classification


def test_topk_counts_rows_whose_target_is_among_the_k_best():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.0, 0.1, 0.9]])
    targets = torch.tensor([1, 2, 0, 2])  # ranked 1st, 2nd, 3rd, 1st
    assert topk_correct(logits, targets, ks=(1, 2, 3)) == {1: 2, 2: 3, 3: 4}
    assert topk_correct(logits, targets, ks=(1, 5)) == {1: 2, 5: 4}  # k past the classes: all


class ChannelMeans(nn.Module):
    """Logits = each channel's mean: a flat colour's class is its brightest channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_classifier_accuracy_over_batches_of_any_size():
    colours = torch.eye(3, dtype=torch.uint8) * 255
    truth = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    said = [0, 1, 2, 0, 1, 0, 0, 2, 2, 1]  # 7 of 10 right
    images = colours[said][:, :, None, None].expand(10, 3, 4, 4).contiguous()
    targets = torch.tensor(truth)
    loader = [(images[:4], targets[:4]), (images[4:7], targets[4:7]), (images[7:], targets[7:])]
    metrics = evaluate_classifier(ChannelMeans(), loader, (0, 0, 0), (1, 1, 1), "cpu")
    assert metrics == {"top1": pytest.approx(0.7), "top5": 1.0}


# ---------------------------------------------------------------- COCO box and mask AP

SIZE = 100
# ground truth: (image id, [x, y, w, h]), all of category 1
TRUTH = [(1, [10, 10, 40, 40]), (2, [50, 40, 30, 30])]


def box_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def ground_truth(categories=(1,)) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": SIZE, "height": SIZE} for i in (1, 2)],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
        "annotations": [
            {
                "id": k + 1,
                "image_id": image,
                "category_id": 1,
                "bbox": box,
                "iscrowd": 0,
                "area": box[2] * box[3],
                "segmentation": rle(box_mask(*box)),
            }
            for k, (image, box) in enumerate(TRUTH)
        ],
    }
    coco.createIndex()
    return coco


def result(image: int, box: list[int], score: float, category: int = 1) -> dict:
    return {
        "image_id": image,
        "category_id": category,
        "bbox": [float(v) for v in box],
        "score": score,
        "segmentation": rle(box_mask(*box)),
    }


def reference_ap(detections: list[tuple[float, float]], n_truth: int, threshold: float) -> float:
    """COCO's AP at one IoU threshold, for one category whose detections each overlap at most
    one ground truth box (given as (score, IoU with it))."""
    ranked = sorted(detections, key=lambda d: -d[0])
    hits = np.cumsum([iou >= threshold for _, iou in ranked])
    recall = hits / n_truth
    precision = hits / np.arange(1, len(ranked) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or more
    points = []
    for r in np.linspace(0, 1, 101):
        reached = np.nonzero(recall >= r - 1e-12)[0]
        points.append(envelope[reached[0]] if len(reached) else 0.0)
    return float(np.mean(points))


def reference(detections) -> dict[str, float]:
    thresholds = np.linspace(0.5, 0.95, 10)
    per_threshold = [reference_ap(detections, len(TRUTH), t) for t in thresholds]
    return {"AP": float(np.mean(per_threshold)), "AP50": per_threshold[0]}


def shifted_iou(dx: int, side: int) -> float:
    return (side - dx) / (side + dx)


@pytest.mark.parametrize(
    "case",
    ["perfect", "one shifted", "a better-scored false positive", "missed one", "duplicate"],
)
def test_coco_ap_is_cocos_definition(case):
    (i1, b1), (i2, b2) = TRUTH
    moved = [b2[0] + 9, *b2[1:]]  # 9 px right: IoU 21/39 with its truth, boxes and masks alike
    cases = {
        "perfect": ([result(i1, b1, 0.9), result(i2, b2, 0.8)], [(0.9, 1.0), (0.8, 1.0)]),
        "one shifted": (
            [result(i1, b1, 0.9), result(i2, moved, 0.8)],
            [(0.9, 1.0), (0.8, shifted_iou(9, 30))],
        ),
        "a better-scored false positive": (
            [result(i1, [60, 60, 20, 20], 0.95), result(i1, b1, 0.9), result(i2, b2, 0.8)],
            [(0.95, 0.0), (0.9, 1.0), (0.8, 1.0)],
        ),
        "missed one": ([result(i1, b1, 0.9)], [(0.9, 1.0)]),
        # a second box on a found object is a false positive, whatever its IoU
        "duplicate": (
            [result(i1, b1, 0.9), result(i1, b1, 0.85), result(i2, b2, 0.8)],
            [(0.9, 1.0), (0.85, 0.0), (0.8, 1.0)],
        ),
    }
    results, scored = cases[case]
    expected = reference(scored)
    metrics = coco_ap(ground_truth(), results)
    for kind in ("bbox", "segm"):
        assert metrics[f"{kind}_AP"] == pytest.approx(expected["AP"], abs=1e-6), kind
        assert metrics[f"{kind}_AP50"] == pytest.approx(expected["AP50"], abs=1e-6), kind
    if case == "perfect":
        assert metrics == {"bbox_AP": 1.0, "bbox_AP50": 1.0, "segm_AP": 1.0, "segm_AP50": 1.0}
    if case == "one shifted":  # matched at IoU 0.50 only: full AP50, AP (1 + 9 x 51/101) / 10
        assert expected == pytest.approx({"AP": (1 + 9 * 51 / 101) / 10, "AP50": 1.0})
    if case == "a better-scored false positive":
        assert expected["AP50"] == pytest.approx(2 / 3)


def test_box_and_mask_ap_are_scored_apart():
    """The right boxes with masks that miss: full box AP, no mask AP."""
    (i1, b1), (i2, b2) = TRUTH
    results = [result(i1, b1, 0.9), result(i2, b2, 0.8)]
    for r, (x, y, w, h) in zip(results, (b1, b2), strict=True):
        r["segmentation"] = rle(box_mask(x + w // 2, y, w // 2, h // 3))  # a corner of it
    metrics = coco_ap(ground_truth(), results)
    assert (metrics["bbox_AP"], metrics["bbox_AP50"]) == (1.0, 1.0)
    assert (metrics["segm_AP"], metrics["segm_AP50"]) == (0.0, 0.0)


def test_coco_ap_of_the_wrong_class_or_nothing_is_zero():
    """A right box with the wrong label finds nothing of its class; a class with no ground
    truth is left out of the mean, as COCO leaves it."""
    (i1, b1), (i2, b2) = TRUTH
    wrong = [result(i1, b1, 0.9, category=2), result(i2, b2, 0.8, category=2)]
    assert coco_ap(ground_truth(categories=(1, 2)), wrong) == dict.fromkeys(
        ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"), 0.0
    )
    assert coco_ap(ground_truth(), []) == dict.fromkeys(
        ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"), 0.0
    )
    right = [result(i1, b1, 0.9), result(i2, b2, 0.8)]
    assert coco_ap(ground_truth(categories=(1, 2)), right)["bbox_AP"] == 1.0


# ---------------------------------------------------------------- segmentation


def test_confusion_matrix_matches_scikit_learn_and_skips_ignored_pixels():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (40, 30))
    target[rng.random((40, 30)) < 0.2] = 255
    pred = rng.integers(0, 5, (40, 30))
    ours = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    keep = target != 255
    theirs = sklearn_confusion_matrix(target[keep], pred[keep], labels=range(5))
    assert np.array_equal(ours.numpy(), theirs)
    assert ours.sum() == keep.sum()


def test_miou_by_hand_and_against_scikit_learn():
    target = torch.tensor([0, 0, 1, 1, 1, 3])
    pred = torch.tensor([0, 1, 1, 1, 3, 3])
    conf = confusion_matrix(pred, target, num_classes=4)
    # class 0: 1 / 2; class 1: 2 / 4; class 3: 1 / 2; class 2 is in neither, so not counted
    metrics = segmentation_metrics(conf)
    assert metrics == pytest.approx({"mIoU": (1 / 2 + 2 / 4 + 1 / 2) / 3, "pixel_acc": 4 / 6})
    assert metrics["mIoU"] == pytest.approx(
        jaccard_score(target, pred, labels=[0, 1, 3], average="macro")
    )
    assert segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64)) == {
        "mIoU": 0.0,
        "pixel_acc": 0.0,
    }
    # one pixel, right: a class present in one pixel counts, and the accuracy is whole
    one = confusion_matrix(torch.tensor([2]), torch.tensor([2]), num_classes=4)
    assert one.shape == (4, 4) and one.sum() == 1  # the classes after the last one seen too
    assert segmentation_metrics(one) == {"mIoU": 1.0, "pixel_acc": 1.0}


def test_evaluate_segmenter_counts_each_pixel_once_at_the_labels_size():
    """UperNet whose logits are a known function of the input (class 1 where red): red boxes
    on black, evaluated against label maps that mark half of each box, and an ignored band."""
    model = build_model("upernet_convnext_atto", num_classes=2)
    model.__class__ = RedSegmenter
    model.eval()
    dataset = []
    for h, w, (y0, x0, y1, x1) in [(96, 128, (16, 32, 80, 96)), (160, 64, (32, 0, 96, 64))]:
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        image[0, y0:y1, x0:x1] = 255
        label = torch.zeros(h, w, dtype=torch.int64)
        label[y0 : (y0 + y1) // 2, x0:x1] = 1  # half the red box is class 1, half is not
        label[:, :4] = 255
        dataset.append((image, label))
    metrics = evaluate_segmenter(model, dataset, image_size=64, num_classes=2, batch_size=2)
    # each box: its top half right as 1, its bottom half wrong (1 where 0), the rest right as 0
    counted = [(lab != 255) for _, lab in dataset]
    red = [(img[0] > 0) for img, _ in dataset]
    ones = [(lab == 1) for _, lab in dataset]
    tp1 = sum(int((o & c).sum()) for o, c in zip(ones, counted, strict=True))
    red_counted = sum(int((r & c).sum()) for r, c in zip(red, counted, strict=True))
    total = sum(int(c.sum()) for c in counted)
    iou1 = tp1 / red_counted
    iou0 = (total - red_counted) / (total - tp1)
    assert metrics["mIoU"] == pytest.approx((iou0 + iou1) / 2, abs=0.02)
    assert metrics["pixel_acc"] == pytest.approx((total - (red_counted - tp1)) / total, abs=0.02)


# ---------------------------------------------------------------- `convnext-serve eval`


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Small synthetic datasets in the three layouts `eval` reads."""
    root = tmp_path_factory.mktemp("shapes")
    for task, size in (("classify", 32), ("detect", 64), ("segment", 64)):
        synth(task, root / task, n=4, n_val=8, seed=3, image_size=size, plain=True)
    # a photo of another size: the checkpoint's preset makes it the model's size
    stars = root / "classify" / "val" / "star"
    with Image.open(next(stars.glob("*.jpg"))) as image:
        image.resize((48, 40)).save(stars / "wider.jpg")
    return root


def constant_checkpoint(path, task, arch, labels, answer, image_size, **kw):
    """A checkpoint whose model answers class `answer` whatever it sees (a detector: the
    background): every weight zero but the last layer's bias."""
    model = build_model(arch, num_classes=len(labels), **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        if task == "classify":
            model.head.bias[answer] = 10.0
        elif task == "segment":
            model.decode_head.conv_seg.bias[answer] = 10.0
        else:  # the box classifier's class 0 is the background: nothing is found
            model.roi_heads.box_predictor.cls_score.bias[answer] = 10.0
    head = {"classify": "linear", "detect": "maskrcnn", "segment": "upernet"}[task]
    meta = CheckpointMeta(
        task=task,
        arch=arch,
        head=head,
        num_classes=len(labels),
        labels=labels,
        image_size=image_size,
        model_kwargs=kw,
        provenance=Provenance(source="trained"),
    )
    return save_checkpoint(model, path, meta)


def test_eval_of_a_classifier_that_always_says_one_class(shapes, tmp_path):
    labels = sorted(CLASSES)  # ImageFolder's order
    answer = labels.index("star")
    ckpt = constant_checkpoint(
        tmp_path / "c.safetensors", "classify", "convnext_atto", labels, answer, 32
    )
    stars = len(list((shapes / "classify" / "val" / "star").glob("*.jpg")))
    metrics = evaluate_checkpoint(
        "classify", shapes / "classify", ckpt, device="cpu", batch_size=3, progress=False
    )
    assert metrics == {"top1": pytest.approx(stars / 9), "top5": 1.0}
    # no device named: CUDA where there is one, else the CPU
    assert evaluate_checkpoint("classify", shapes / "classify", ckpt, progress=False) == metrics
    with pytest.raises(ValueError, match="is a classify checkpoint, not detect"):
        evaluate_checkpoint("detect", shapes / "detect", ckpt, device="cpu", progress=False)


def test_eval_of_a_segmenter_that_always_says_one_class(shapes, tmp_path):
    labels = read_labels(shapes / "segment")
    answer = labels.index("circle")
    ckpt = constant_checkpoint(
        tmp_path / "s.safetensors", "segment", "upernet_convnext_atto", labels, answer, 64
    )
    maps = [
        np.asarray(Image.open(p))
        for p in sorted((shapes / "segment" / "annotations" / "validation").glob("*.png"))
    ]
    pixels = np.concatenate([m.ravel() for m in maps])
    said = np.mean(pixels == answer)  # its IoU; every other class present scores 0
    present = len(np.unique(pixels))
    metrics = evaluate_checkpoint("segment", shapes / "segment", ckpt, device="cpu", progress=False)
    assert metrics == pytest.approx({"mIoU": said / present, "pixel_acc": said})


def test_eval_of_a_detector_that_finds_nothing(shapes, tmp_path):
    ckpt = constant_checkpoint(
        tmp_path / "d.safetensors",
        "detect",
        "maskrcnn_convnext_atto",
        list(CLASSES),
        0,
        64,
        min_size=64,
        max_size=64,
    )
    metrics = evaluate_checkpoint("detect", shapes / "detect", ckpt, device="cpu", progress=False)
    assert metrics == dict.fromkeys(("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"), 0.0)
