"""Mask R-CNN on a ConvNeXt + FPN backbone (the paper's COCO detection setup), on torchvision.

`build_model("maskrcnn_convnext_tiny", num_classes=N)`: N real classes (background is added
inside), torchvision's `MaskRCNN` with the ConvNeXt features-only backbone's four normed stage
outputs into torchvision's FPN (256 channels, plus the max-pool level). Images go in as float
RGB in [0, 1]; the model normalises them itself (on its device) with `image_mean`/`image_std`.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .checkpoint import IMAGENET_MEAN, IMAGENET_STD
from .convnext import CONVNEXT_CONFIGS, ConvNeXt
from .images import padded_size_groups, to_float_images
from .masks import paste_masks_rle
from .registry import register_model


class ConvNeXtFPN(nn.Module):
    """ConvNeXt stage outputs (strides 4..32, each LayerNorm-ed) through an FPN.

    `body` is a `ConvNeXt(features_only=True)`, so its keys are the classifier's
    (`body.stages.0.0.dwconv.weight`, ...) plus `body.norm0..3`: a classification checkpoint's
    weights load into it directly.
    """

    def __init__(self, body: ConvNeXt, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.out_channels, out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class AlignedRoIAlign(MultiScaleRoIAlign):
    """mmdet's RoI extractor, for weights trained with it: half-pixel-aligned RoIAlign
    (`aligned=True`) with adaptive sampling, each box on the FPN level of strides 4..32 that
    floor(log2(sqrt(area) / 56)) picks. torchvision's `MultiScaleRoIAlign`, which this replaces
    for them, samples unaligned (two points a bin) and has no switch for it."""

    STRIDES = (4, 8, 16, 32)

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int = 0):
        super().__init__(featmap_names, output_size, sampling_ratio)

    def forward(
        self,
        x: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)]
        )
        feats = [x[name] for name in self.featmap_names]
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
        levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, len(feats) - 1).long()
        size = self.output_size
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *size))
        for level, (feat, stride) in enumerate(zip(feats, self.STRIDES, strict=False)):
            index = torch.where(levels == level)[0]
            if len(index):
                # the boxes stay float32: in bf16 a coordinate near 128 px is off by up to 0.5
                pooled = roi_align(
                    feat.to(rois.dtype),
                    rois[index],
                    size,
                    1 / stride,
                    self.sampling_ratio,
                    aligned=True,
                )
                out[index] = pooled.to(out.dtype)
        return out


def _named_parameters(*functions) -> frozenset[str]:
    return frozenset(
        name
        for f in functions
        for name, p in inspect.signature(f).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )


# What torchvision's MaskRCNN takes by name (FasterRCNN's options, and its transform's), less
# what `maskrcnn_convnext` builds itself.
MASKRCNN_OPTIONS = _named_parameters(
    MaskRCNN.__init__, FasterRCNN.__init__, GeneralizedRCNNTransform.__init__
) - {"backbone", "num_classes", "box_head", "box_predictor", "mask_head", "mask_predictor"}


def maskrcnn_convnext(
    arch: str,
    num_classes: int = 80,
    min_size: int = 800,
    max_size: int = 1333,
    drop_path_rate: float = 0.0,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_dim: int = 256,
    roi_align: str = "torchvision",
    **kw,
) -> MaskRCNN:
    """Mask R-CNN with a ConvNeXt-`arch` + FPN backbone; extra `kw` go to torchvision's MaskRCNN.

    The widths default to the paper's (FPN 256, box head 2 x fc 1024, mask head 4 x conv 256);
    narrower heads are for small images with few classes, where the RoI heads, not the
    backbone, take most of a training step. `roi_align="mmdet"`: RoIAlign as the paper's
    released weights were trained with it (`AlignedRoIAlign`).
    """
    if roi_align not in ("torchvision", "mmdet"):
        raise ValueError(f"roi_align must be 'torchvision' or 'mmdet', got {roi_align!r}")
    if roi_align == "mmdet":
        levels = ["0", "1", "2", "3"]
        kw.update(
            box_roi_pool=AlignedRoIAlign(levels, 7), mask_roi_pool=AlignedRoIAlign(levels, 14)
        )
    unknown = sorted(set(kw) - MASKRCNN_OPTIONS)
    if unknown:
        # torchvision passes unknown keywords on to its transform, which ignores them: a typo
        # in a checkpoint's model_kwargs would otherwise change nothing, silently.
        raise TypeError(f"maskrcnn_convnext got unknown argument(s): {', '.join(unknown)}")
    depths, dims = CONVNEXT_CONFIGS[arch]
    body = ConvNeXt(depths=depths, dims=dims, drop_path_rate=drop_path_rate, features_only=True)
    classes = num_classes + 1  # with the background
    model = MaskRCNN(
        ConvNeXtFPN(body, fpn_channels),
        num_classes=None,  # the predictors below carry it
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),  # 7x7: the box RoIAlign's
        box_predictor=FastRCNNPredictor(box_head_dim, classes),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_head_dim,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, classes),
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        **kw,
    )
    return model


def _register(arch: str) -> None:
    def build(num_classes: int = 80, **kw) -> MaskRCNN:
        return maskrcnn_convnext(arch, num_classes=num_classes, **kw)

    build.__doc__ = f"Mask R-CNN, {arch} + FPN backbone."
    register_model(f"maskrcnn_{arch}", task="detect")(build)


for _arch in CONVNEXT_CONFIGS:
    _register(_arch)


@dataclass
class Detections:
    """One image's detections, in the pixel coordinates of the requested output size."""

    height: int
    width: int
    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2
    class_ids: np.ndarray  # (K,) int64, 0-based indices into the model's labels
    scores: np.ndarray  # (K,) float32, descending
    masks: list[dict] | None  # K COCO RLEs at (height, width), or None when not asked for


def _per_image(value: float | int | Sequence, n: int) -> list:
    return list(value) if isinstance(value, Sequence) else [value] * n


def _roi_heads(heads: nn.Module, features, proposals, image_sizes, masks: bool) -> list[dict]:
    """The RoI heads' detections; without their mask branch when no image wants masks (it
    runs on every box the heads keep, down to their 0.05 score floor). Both torchvision's
    heads and `CascadeRoIHeads` skip it while `mask_roi_pool` is None."""
    if masks:
        return heads(features, proposals, image_sizes)[0]
    pool = heads.mask_roi_pool
    heads.mask_roi_pool = None
    try:
        return heads(features, proposals, image_sizes)[0]
    finally:
        heads.mask_roi_pool = pool


@torch.inference_mode()
def detect(
    model: MaskRCNN,
    images: Sequence[torch.Tensor],
    score_threshold: float | Sequence[float] = 0.5,
    max_detections: int | Sequence[int] = 100,
    masks: bool | Sequence[bool] = True,
    output_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Detections]:
    """Detect objects in a batch of uint8 RGB images (3, H, W) of any, differing, sizes.

    Each image may carry its own threshold, cap and mask choice (they batch requests). Boxes and
    masks land in each image's own pixels, or in `output_sizes[i]` = (H, W) when given: the
    caller that downscaled a photo before sending it gets results in the photo's coordinates.
    Images run together when they pad to the same input size, so an image's detections do not
    depend on what it was batched with.
    """
    n = len(images)
    thresholds = _per_image(score_threshold, n)
    caps = _per_image(max_detections, n)
    want_masks = _per_image(masks, n)
    device = next(model.parameters()).device
    floats = to_float_images(images, device)
    sizes = output_sizes or [tuple(img.shape[-2:]) for img in images]

    # Let the RoI heads keep everything any image in the batch may want; filter per image below.
    heads = model.roi_heads
    heads.score_thresh = min(min(thresholds), 0.05)
    heads.detections_per_img = max(caps)
    # torchvision's transform, a step at a time: images padded to the same size run together
    transform = model.transform
    inputs = [transform.resize(transform.normalize(f), None)[0] for f in floats]
    input_sizes = [tuple(x.shape[-2:]) for x in inputs]
    raw: list[dict[str, torch.Tensor]] = [{}] * n
    for group in padded_size_groups(input_sizes, transform.size_divisible):
        tensors = transform.batch_images([inputs[i] for i in group], transform.size_divisible)
        batch = ImageList(tensors, [input_sizes[i] for i in group])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        found = _roi_heads(heads, features, proposals, batch.image_sizes, any(want_masks))
        for i, det in zip(group, found, strict=True):
            raw[i] = det

    results = []
    for i, det in enumerate(raw):
        keep = (det["scores"] >= thresholds[i]).nonzero().flatten()[: caps[i]]
        height, width = (int(s) for s in sizes[i])
        boxes = resize_boxes(det["boxes"][keep], input_sizes[i], (height, width))
        rles = None
        if want_masks[i]:  # (the heads ran the mask branch: some image wanted masks)
            rles = paste_masks_rle(det["masks"][keep, 0], boxes, height, width)
        results.append(
            Detections(
                height=height,
                width=width,
                boxes=boxes.float().cpu().numpy(),
                class_ids=(det["labels"][keep] - 1).cpu().numpy(),
                scores=det["scores"][keep].float().cpu().numpy(),
                masks=rles,
            )
        )
    return results
