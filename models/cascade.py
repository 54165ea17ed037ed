"""Cascade Mask R-CNN on a ConvNeXt + FPN backbone: the paper's main COCO detector (Table 3).

`build_model("cascade_maskrcnn_convnext_tiny", num_classes=N)` is `maskrcnn_convnext` with its
RoI heads replaced by `CascadeRoIHeads`, as the official config has them
(`object_detection/configs/convnext/cascade_mask_rcnn_convnext_*_3x_coco*.py`, after mmdet's
`CascadeRoIHead`): three box stages trained at IoU 0.5 / 0.6 / 0.7, each a 4-conv + 1-fc head
(BatchNorm, the config's SyncBN at inference) with its own box-coder scale (target stds
0.1/0.2, 0.05/0.1, 0.033/0.067) and GIoU loss on the decoded boxes; regression per class, as
the ConvNeXt configs set it (`reg_class_agnostic=False`; the parameter counts the paper gives
need it), or class-agnostic as mmdet's base config has it (`class_agnostic=True`);
stage losses weighted 1 / 0.5 / 0.25; each stage refines the boxes the next one sees. At
inference the class scores are averaged over the stages and the last stage's boxes are kept;
each stage has its own mask head, whose probabilities are averaged. Everything else (RPN,
RoIAlign, box coder, matcher, sampler, the mask loss) is torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from .convnext import CONVNEXT_CONFIGS
from .detection import maskrcnn_convnext
from .registry import register_model

# Per stage: the IoU a proposal needs to count as an object, and the box coder's weights (the
# reciprocals of mmdet's target_stds).
STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_CODER_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
GIOU_LOSS_WEIGHT = 10.0


class AgnosticBoxPredictor(nn.Module):
    """Class scores (with the background) and one box regression for every class."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeStage(nn.Module):
    """One box stage: its head and predictor, and (as torchvision's `RoIHeads`, holding no
    layers) its matcher at its IoU, the shared sampler's settings and its box coder."""

    def __init__(
        self,
        head: nn.Module,
        predictor: AgnosticBoxPredictor,
        iou: float,
        coder_weights: Sequence[float],
        batch_size_per_image: int,
        positive_fraction: float,
    ):
        super().__init__()
        self.head, self.predictor = head, predictor
        self.sampling = RoIHeads(
            None,
            None,
            None,
            iou,
            iou,
            batch_size_per_image,
            positive_fraction,
            tuple(coder_weights),
            0.05,
            0.5,
            100,
        )

    def forward(self, box_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(box_features))

    def decode(
        self, regression: torch.Tensor, proposals: list[torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """The boxes (N, 4) the regression gives, each of its label's (class-specific) or the
        one box (class-agnostic)."""
        boxes = self.sampling.box_coder.decode(regression, proposals)  # (N, 1 or K, 4)
        if boxes.shape[1] == 1:
            return boxes[:, 0]
        return boxes[torch.arange(len(boxes), device=boxes.device), labels]


def _per_image(
    boxes: torch.Tensor, like: list[torch.Tensor], image_shapes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """A stage's boxes (N, 4) as the next stage's proposals: split per image as `like` is,
    clipped to each image."""
    parts = boxes.split([len(p) for p in like])
    return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(parts, image_shapes, strict=True)]


class CascadeRoIHeads(nn.Module):
    """Drop-in for torchvision's `RoIHeads` in `MaskRCNN` (same inputs, same outputs and the
    same `score_thresh` / `nms_thresh` / `detections_per_img` knobs)."""

    def __init__(
        self,
        box_roi_pool: nn.Module,
        stages: Sequence[CascadeStage],
        mask_roi_pool: nn.Module,
        mask_heads: Sequence[nn.Module],
        mask_predictors: Sequence[nn.Module],
        stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        if not len(stages) == len(mask_heads) == len(mask_predictors) == len(stage_loss_weights):
            raise ValueError("every stage needs a box head, a mask head and a loss weight")
        self.box_roi_pool, self.mask_roi_pool = box_roi_pool, mask_roi_pool
        self.stages = nn.ModuleList(stages)
        self.mask_heads = nn.ModuleList(mask_heads)
        self.mask_predictors = nn.ModuleList(mask_predictors)
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img = detections_per_img

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _losses(self, features, proposals, image_shapes, targets) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for i, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights, strict=True)):
            proposals, matched, labels, _ = stage.sampling.select_training_samples(
                proposals, targets
            )
            box_features = self.box_roi_pool(features, proposals, image_shapes)
            logits, regression = stage(box_features)
            labels_all = torch.cat(labels)
            # positives: their object's class; the rest: the class they look most like
            guess = torch.where(labels_all > 0, labels_all, logits[:, 1:].argmax(1) + 1)
            boxes = stage.decode(regression, proposals, guess)
            matched_gt = torch.cat(
                [
                    t["boxes"][m] if len(t["boxes"]) else torch.zeros_like(p)
                    for t, m, p in zip(targets, matched, proposals, strict=True)
                ]
            )
            positive = labels_all > 0
            # mmdet's averages: both over every sampled RoI, the box loss summed on positives
            losses[f"s{i}_loss_classifier"] = weight * F.cross_entropy(logits, labels_all)
            giou = generalized_box_iou_loss(boxes[positive], matched_gt[positive], reduction="sum")
            losses[f"s{i}_loss_box_reg"] = weight * GIOU_LOSS_WEIGHT * giou / labels_all.numel()
            positives = [p[lab > 0] for p, lab in zip(proposals, labels, strict=True)]
            pos_matched = [m[lab > 0] for m, lab in zip(matched, labels, strict=True)]
            mask_logits = self._mask_logits(i, features, positives, image_shapes)
            losses[f"s{i}_loss_mask"] = weight * maskrcnn_loss(
                mask_logits,
                positives,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                pos_matched,
            )
            # the next stage starts from this one's boxes (no gradient through them)
            proposals = _per_image(boxes.detach(), proposals, image_shapes)
        return losses

    def _mask_logits(self, stage: int, features, boxes, image_shapes) -> torch.Tensor:
        x = self.mask_roi_pool(features, boxes, image_shapes)
        return self.mask_predictors[stage](self.mask_heads[stage](x))

    def _detect(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        logits_sum = None
        for i, stage in enumerate(self.stages):
            box_features = self.box_roi_pool(features, proposals, image_shapes)
            logits, regression = stage(box_features)
            logits_sum = logits if logits_sum is None else logits_sum + logits
            if i < len(self.stages) - 1:
                guess = logits[:, 1:].argmax(1) + 1
                boxes = stage.decode(regression, proposals, guess)
                proposals = _per_image(boxes, proposals, image_shapes)
        # mmdet averages the stages' logits, then the last stage's postprocessing applies
        logits = logits_sum / len(self.stages)
        last = self.stages[-1].sampling
        last.score_thresh, last.nms_thresh = self.score_thresh, self.nms_thresh
        last.detections_per_img = self.detections_per_img
        if regression.shape[1] == 4:  # class-agnostic: the same box for every class
            regression = regression.repeat(1, logits.shape[1])
        boxes, scores, labels = last.postprocess_detections(
            logits, regression, proposals, image_shapes
        )
        result = [
            {"boxes": b, "labels": c, "scores": s}
            for b, s, c in zip(boxes, scores, labels, strict=True)
        ]
        if self.mask_roi_pool is None:  # boxes only (as torchvision's heads without masks)
            return result
        pooled = self.mask_roi_pool(features, boxes, image_shapes)  # once for every stage
        probs = [
            maskrcnn_inference(predictor(head(pooled)), labels)
            for head, predictor in zip(self.mask_heads, self.mask_predictors, strict=True)
        ]
        for n, r in enumerate(result):
            r["masks"] = torch.stack([p[n] for p in probs]).mean(0)
        return result


def cascade_maskrcnn_convnext(
    arch: str,
    num_classes: int = 80,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_dim: int = 256,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    class_agnostic: bool = False,
    **kw,
) -> MaskRCNN:
    """Cascade Mask R-CNN with a ConvNeXt-`arch` + FPN backbone; other `kw` as
    `maskrcnn_convnext` takes them (image sizes, normalisation, RPN settings)."""
    model = maskrcnn_convnext(
        arch,
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        box_head_dim=box_head_dim,
        mask_head_dim=mask_head_dim,
        **kw,
    )
    classes = num_classes + 1
    predictor = AgnosticBoxPredictor if class_agnostic else FastRCNNPredictor
    stages = [
        CascadeStage(
            FastRCNNConvFCHead(
                (fpn_channels, 7, 7), [fpn_channels] * 4, [box_head_dim], norm_layer=nn.BatchNorm2d
            ),
            predictor(box_head_dim, classes),
            iou,
            weights,
            box_batch_size_per_image,
            box_positive_fraction,
        )
        for iou, weights in zip(STAGE_IOUS, STAGE_CODER_WEIGHTS, strict=True)
    ]
    heads = model.roi_heads
    model.roi_heads = CascadeRoIHeads(
        heads.box_roi_pool,
        stages,
        heads.mask_roi_pool,
        [MaskRCNNHeads(fpn_channels, (mask_head_dim,) * 4, 1) for _ in stages],
        [MaskRCNNPredictor(mask_head_dim, mask_head_dim, classes) for _ in stages],
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img,
    )
    return model


def _register(arch: str) -> None:
    def build(num_classes: int = 80, **kw) -> MaskRCNN:
        return cascade_maskrcnn_convnext(arch, num_classes=num_classes, **kw)

    build.__doc__ = f"Cascade Mask R-CNN, {arch} + FPN backbone."
    register_model(f"cascade_maskrcnn_{arch}", task="detect")(build)


for _arch in CONVNEXT_CONFIGS:
    _register(_arch)
