"""Metrics: top-1/top-5, COCO box and mask AP (pycocotools), mIoU and pixel accuracy.

`evaluate_checkpoint` is what `convnext-serve eval` runs: a served checkpoint against the
validation split of a dataset in the layouts of docs/training.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their target among the k highest logits, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == targets[:, None]
    return {k: int(hits[:, : min(k, k_max)].any(1).sum()) for k in ks}


@torch.inference_mode()
def evaluate_classifier(
    model: nn.Module, loader: Iterable, mean, std, device, progress=False
) -> dict[str, float]:
    from .classification import normalize

    correct, total = {1: 0, 5: 0}, 0
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        logits = model(normalize(images, mean, std, device)).float().cpu()
        for k, n in topk_correct(logits, targets).items():
            correct[k] += n
        total += len(targets)
    return {"top1": correct[1] / max(1, total), "top5": correct[5] / max(1, total)}


@torch.inference_mode()
def evaluate_detector(model: nn.Module, dataset, progress=False, batch_size=4) -> dict[str, float]:
    """COCO box and mask AP of `model` on a `models.data.detection_dataset` split."""
    from .detection import detect

    coco = copy.deepcopy(dataset.coco)  # COCOeval rewrites the ground truth's segmentations
    cat_ids = sorted(coco.getCatIds())
    results = []
    ids = list(range(len(dataset)))
    for start in tqdm(range(0, len(ids), batch_size), desc="eval", disable=not progress):
        chunk = [dataset[i] for i in ids[start : start + batch_size]]
        dets = detect(model, [img for img, _ in chunk], score_threshold=0.05, max_detections=100)
        for (_, target), det in zip(chunk, dets, strict=True):
            image_id = int(target["image_id"])
            for box, cls, score, rle in zip(
                det.boxes, det.class_ids, det.scores, det.masks, strict=True
            ):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": cat_ids[int(cls)],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                        "segmentation": rle,
                    }
                )
    return coco_ap(coco, results)


def coco_ap(coco, results: list[dict]) -> dict[str, float]:
    """COCO's box and mask AP (IoU 0.5:0.95) and AP50 of `results` (COCO result dicts, each
    with `bbox` and an RLE `segmentation`) against the ground truth `coco` (a `COCO`, whose
    annotations this rewrites), by pycocotools; 0 where nothing was found."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"bbox_AP": 0.0, "bbox_AP50": 0.0, "segm_AP": 0.0, "segm_AP50": 0.0}
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        detections = coco.loadRes(results)
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(coco, detections, iou_type)
            ev.params.imgIds = sorted(coco.getImgIds())
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            metrics[f"{iou_type}_AP"] = max(0.0, float(ev.stats[0]))
            metrics[f"{iou_type}_AP50"] = max(0.0, float(ev.stats[1]))
    return metrics


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(num_classes, num_classes) pixel counts: row = the true class, column = the predicted
    one; pixels whose target is `ignore_index` are not counted."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU over classes that occur in the ground truth or predictions, and pixel accuracy."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {
        "mIoU": float(iou.mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / conf.sum().clamp(min=1)),
    }


@torch.inference_mode()
def evaluate_segmenter(
    model: nn.Module,
    dataset,
    image_size: int,
    num_classes: int,
    progress=False,
    batch_size=4,
    ignore_index: int = 255,
) -> dict[str, float]:
    from .segmentation import segment

    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    ids = list(range(len(dataset)))
    for start in tqdm(range(0, len(ids), batch_size), desc="eval", disable=not progress):
        chunk = [dataset[i] for i in ids[start : start + batch_size]]
        maps = segment(model, [img for img, _ in chunk], image_size=image_size)
        for (_, target), pred in zip(chunk, maps, strict=True):
            conf += confusion_matrix(pred.cpu(), torch.as_tensor(target), num_classes, ignore_index)
    return segmentation_metrics(conf)


# Wiring (device, loader, progress bars), run end to end for each task by the tests; its
# mutants cannot change a metric on a CPU, so the mutation run leaves it out.
# pragma: no mutate start
def evaluate_checkpoint(
    task: str,
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    device: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """The metrics of a served checkpoint on a dataset's validation split."""
    from . import data as datasets

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_checkpoint(checkpoint, device=device)
    if meta.task != task:
        raise ValueError(f"{checkpoint} is a {meta.task} checkpoint, not {task}")
    if task == "classify":
        from .presets import preset_for

        view = preset_for(meta)  # the pixels the service would give the model
        ds = datasets.classification_dataset(data, "val", view, view.min_short_side)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=2)
        return evaluate_classifier(model, loader, meta.mean, meta.std, device, progress)
    if task == "detect":
        ds = datasets.detection_dataset(data, "val")
        return evaluate_detector(model, ds, progress)
    ds = datasets.segmentation_dataset(data, "validation")
    return evaluate_segmenter(model, ds, meta.image_size, meta.num_classes, progress)


# pragma: no mutate end
