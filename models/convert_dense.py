"""The paper's released detectors and segmenters into served checkpoints, without mm*.

The official repository released its COCO detectors as mmdetection checkpoints (Mask R-CNN and
Cascade Mask R-CNN) and its ADE20K segmenters as mmsegmentation ones (UperNet). `dense_filter`
renames their keys to this project's models (torchvision's detection modules, `models.cascade`,
`models.segmentation`) and fixes what the layouts disagree on: mmdet puts the background class
last in the box classifier and has none in the box regression and the mask logits, where
torchvision has it first; its RoIAlign is half-pixel aligned with adaptive sampling
(`roi_align="mmdet"`, stored with the checkpoint). Every key is renamed by a rule or refused:
nothing is silently dropped, and a tensor left out fails the load. Anchors (scale 8, ratios
0.5/1/2, strides 4..64), box-coder scales, the FPN's max-pool level, the RoI level mapping and
the test pipeline (shorter side 800 up to 1333, ImageNet mean/std on RGB, padding to 32; ADE20K
windows of 512 or 640) are the same on both sides.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .checkpoint import HEAD_OF_TASK, CheckpointError, CheckpointMeta, Provenance, save_checkpoint
from .checkpoint import state_dict_mismatch as _mismatch
from .convert import fetch, read_state_dict
from .labels import ade20k_labels, coco_labels
from .registry import build_model, model_task


@dataclass(frozen=True)
class DenseRelease:
    """A released COCO detector or ADE20K segmenter and the paper's figure for it."""

    arch: str
    path: str  # under the official download base
    image_size: int  # detection: the shorter side; segmentation: the window
    paper: str

    @property
    def dataset(self) -> str:
        return "coco" if self.path.startswith("coco/") else "ade20k"


def _dense_releases() -> dict[str, DenseRelease]:
    releases = {
        "maskrcnn_convnext_tiny_1k_3x_coco": DenseRelease(
            "maskrcnn_convnext_tiny",
            "coco/mask_rcnn_convnext_tiny_1k_3x.pth",
            800,
            "box AP 46.2, mask AP 41.7",
        ),
    }
    cascade = {
        ("tiny", "1k"): "50.4 / 43.7",
        ("small", "1k"): "51.9 / 45.0",
        ("base", "1k"): "52.7 / 45.6",
        ("base", "22k"): "54.0 / 46.9",
        ("large", "22k"): "54.8 / 47.6",
        ("xlarge", "22k"): "55.2 / 47.7",
    }
    for (size, pre), ap in cascade.items():
        box, mask = ap.split(" / ")
        releases[f"cascade_maskrcnn_convnext_{size}_{pre}_3x_coco"] = DenseRelease(
            f"cascade_maskrcnn_convnext_{size}",
            f"coco/cascade_mask_rcnn_convnext_{size}_{pre}_3x.pth",
            800,
            f"box AP {box}, mask AP {mask}",
        )
    upernet = {
        ("tiny", "1k", 512): "46.0",
        ("small", "1k", 512): "48.7",
        ("base", "1k", 512): "49.1",
        ("base", "22k", 640): "52.6",
        ("large", "22k", 640): "53.2",
        ("xlarge", "22k", 640): "53.6",
    }
    for (size, pre, res), miou in upernet.items():
        releases[f"upernet_convnext_{size}_{pre}_ade20k_{res}"] = DenseRelease(
            f"upernet_convnext_{size}",
            f"ade20k/upernet_convnext_{size}_{pre}_{res}x{res}.pth",
            res,
            f"mIoU {miou} (single scale)",
        )
    return releases


DENSE_RELEASES: dict[str, DenseRelease] = _dense_releases()

# (pattern, replacement) in order; the first that matches renames the key.
_DETECTION_RULES = [
    (r"^backbone\.", "backbone.body."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    # Mask R-CNN: one box head (2 shared fcs) and one mask head
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"^roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
    # Cascade: a box head (4 convs with BN, 1 fc) and a mask head per stage
    (r"^roi_head\.bbox_head\.(\d)\.shared_convs\.(\d+)\.conv\.", r"roi_heads.stages.\1.head.\2.0."),
    (r"^roi_head\.bbox_head\.(\d)\.shared_convs\.(\d+)\.bn\.", r"roi_heads.stages.\1.head.\2.1."),
    (r"^roi_head\.bbox_head\.(\d)\.shared_fcs\.0\.", r"roi_heads.stages.\1.head.5."),
    (r"^roi_head\.bbox_head\.(\d)\.fc_cls\.", r"roi_heads.stages.\1.predictor.cls_score."),
    (r"^roi_head\.bbox_head\.(\d)\.fc_reg\.", r"roi_heads.stages.\1.predictor.bbox_pred."),
    (r"^roi_head\.mask_head\.(\d)\.convs\.(\d+)\.conv\.", r"roi_heads.mask_heads.\1.\2.0."),
    (r"^roi_head\.mask_head\.(\d)\.upsample\.", r"roi_heads.mask_predictors.\1.conv5_mask."),
    (
        r"^roi_head\.mask_head\.(\d)\.conv_logits\.",
        r"roi_heads.mask_predictors.\1.mask_fcn_logits.",
    ),
]
_SEGMENTATION_RULES = [
    (r"^backbone\.", "backbone."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"decode_head.ppm.\1.1.0."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"decode_head.ppm.\1.1.1."),
    (r"^decode_head\.(bottleneck|fpn_bottleneck)\.conv\.", r"decode_head.\1.0."),
    (r"^decode_head\.(bottleneck|fpn_bottleneck)\.bn\.", r"decode_head.\1.1."),
    (r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.", r"decode_head.\1.\2.0."),
    (r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.bn\.", r"decode_head.\1.\2.1."),
    (r"^decode_head\.conv_seg\.", "decode_head.conv_seg."),
    (r"^auxiliary_head\.convs\.0\.conv\.", "auxiliary_head.conv.0."),
    (r"^auxiliary_head\.convs\.0\.bn\.", "auxiliary_head.conv.1."),
    (r"^auxiliary_head\.conv_seg\.", "auxiliary_head.conv_seg."),
]


def dense_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """'mmdet' or 'mmseg' from the keys, None for anything else."""
    if any(k.startswith("rpn_head.") for k in sd) and any(k.startswith("roi_head.") for k in sd):
        return "mmdet"
    if any(k.startswith("decode_head.") for k in sd) and any(k.startswith("backbone.") for k in sd):
        return "mmseg"
    return None


def _background_first(key: str, v: torch.Tensor) -> torch.Tensor:
    """mmdet's class axis to torchvision's: the box classifier's background moves from last
    to first; the per-class box regression and the mask logits, which have no background,
    get a zero one in front (torchvision never reads it)."""
    if re.search(r"\.cls_score\.(weight|bias)$", key):
        return torch.cat([v[-1:], v[:-1]])
    # (a class-agnostic regression has one box and no class axis: it stays as it is)
    if re.search(r"^roi_heads\..*\.bbox_pred\.(weight|bias)$", key) and len(v) > 4:
        return torch.cat([torch.zeros_like(v[:4]), v])
    if re.search(r"\.mask_fcn_logits\.(weight|bias)$", key):
        return torch.cat([torch.zeros_like(v[:1]), v])
    return v


def dense_filter(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """An mmdet or mmseg state dict in this project's keys; raises `ValueError` naming the
    keys no rule renames."""
    rules = _DETECTION_RULES if layout == "mmdet" else _SEGMENTATION_RULES
    out, unknown = {}, []
    for key, value in sd.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                new = re.sub(pattern, replacement, key, count=1)
                out[new] = _background_first(new, value) if layout == "mmdet" else value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        )
        raise ValueError(f"{len(unknown)} key(s) of the {layout} checkpoint have no place: {shown}")
    return out


def _model_kwargs(arch: str, sd: dict[str, torch.Tensor], image_size: int) -> dict:
    if model_task(arch) != "detect":
        return {}
    kwargs: dict = {"min_size": image_size, "max_size": 1333, "roi_align": "mmdet"}
    if sd.get("roi_heads.stages.0.predictor.bbox_pred.weight", torch.empty(5)).shape[0] == 4:
        kwargs["class_agnostic"] = True
    return kwargs


def convert_dense_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    arch: str | None = None,
    labels: list[str] | None = None,
    image_size: int | None = None,
) -> CheckpointMeta:
    """Convert `src` (a file, a URL or a release name of `DENSE_RELEASES`) into a served
    detector or segmenter checkpoint, with COCO or ADE20K labels where they fit."""
    release = DENSE_RELEASES.get(str(src))
    path, source = fetch(src, release.path if release else None)
    dataset, paper = (release.dataset, release.paper) if release else ("", "")
    if release is not None:
        arch, image_size = arch or release.arch, image_size or release.image_size
    if arch is None:
        raise ValueError(f"{src}: give --arch (e.g. cascade_maskrcnn_convnext_tiny)")
    task = model_task(arch)

    sd = read_state_dict(path)
    layout = dense_layout(sd)
    if layout != {"detect": "mmdet", "segment": "mmseg"}.get(task):
        raise CheckpointError(path, f"not an mmdet/mmseg checkpoint of a {task} model")
    try:
        sd = dense_filter(sd, layout)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if task == "detect":
        num_classes = sd[next(k for k in sd if k.endswith("cls_score.weight"))].shape[0] - 1
        image_size = image_size or 800
    else:
        num_classes = sd["decode_head.conv_seg.weight"].shape[0]
        image_size = image_size or 512
    kwargs = _model_kwargs(arch, sd, image_size)
    model = build_model(arch, num_classes=num_classes, **kwargs)
    problem = _mismatch(model.state_dict(), sd)
    if problem:
        raise CheckpointError(path, f"weights do not match {arch}: {problem}")
    model.load_state_dict(sd, strict=True)

    if labels is None:
        known = {80: coco_labels, 150: ade20k_labels}
        labels = known[num_classes]() if num_classes in known else None
    labels = labels or [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for {num_classes} classes")
    meta = CheckpointMeta(
        task=task,
        arch=arch,
        head=HEAD_OF_TASK[task],
        num_classes=num_classes,
        labels=labels,
        image_size=image_size,
        crop_pct=1.0,
        interpolation="bilinear",
        provenance=Provenance(
            source="converted",
            dataset=dataset,
            upstream=source,
            upstream_layout=layout,
            paper=paper,
        ),
        model_kwargs=kwargs,
    )
    save_checkpoint(model, out, meta)
    return meta
