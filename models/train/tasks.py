"""What differs between the three tasks: model, data pipeline, loss, evaluation, metadata.

The training loop (`loop.py`) is shared; a task object supplies these pieces.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from .. import data as datasets
from ..checkpoint import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckpointMeta,
    Provenance,
    init_backbone,
    read_tensors,
)
from ..classification import normalize, resize_crop
from ..evaluate import evaluate_classifier, evaluate_detector, evaluate_segmenter
from ..presets import DETECT_MAX_SIZE
from ..registry import build_model
from .config import TrainConfig


def _load_init(model: nn.Module, cfg: TrainConfig) -> None:
    """`--init`: a classifier's weights into a classifier (fine-tuning) or a dense backbone."""
    if not cfg.init:
        return
    if cfg.task != "classify":
        init_backbone(model, cfg.init)
        return
    tensors = {k: v for k, v in read_tensors(cfg.init).items() if not k.startswith("head.")}
    model.load_state_dict(tensors, strict=False)


# the most decoded training images `ClassifyTask` keeps in memory (uint8 bytes)
IN_MEMORY_BYTES = 2 << 30


class ClassifyTask:
    primary = "top1"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.image_size = cfg.image_size or 224
        self.loader_workers = cfg.loader_workers
        self.train_set = datasets.classification_dataset(cfg.data, "train", self._train_view())
        self.labels = list(self.train_set.classes)
        s = self.image_size
        if self._view_is_fixed() and len(self.train_set) * 3 * s * s <= IN_MEMORY_BYTES:
            # Decoding and transforming each image every epoch cost a small-image run a third
            # of its time on two cores; here they are decoded once, and flipped per batch.
            self.train_set = self._decoded_once()
            self.loader_workers = 0
        view = partial(
            resize_crop,
            image_size=self.image_size,
            crop_pct=cfg.crop_pct,
            interpolation=cfg.interpolation,
        )
        self.val_set = datasets.classification_dataset(cfg.data, "val", view)
        self.mixup = self._mixup()

    def _train_view(self) -> T.Compose:
        cfg = self.cfg
        steps = [self._crop()]
        if cfg.hflip > 0:
            steps.append(T.RandomHorizontalFlip(cfg.hflip))
        if cfg.vflip > 0:
            steps.append(T.RandomVerticalFlip(cfg.vflip))
        if cfg.randaug_ops > 0:
            steps.append(T.RandAugment(cfg.randaug_ops, cfg.randaug_magnitude))
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if cfg.reprob > 0:
            steps.append(T.RandomErasing(p=cfg.reprob, value="random"))
        return T.Compose(steps)

    def _crop(self) -> T.RandomResizedCrop:
        return T.RandomResizedCrop(
            self.image_size,
            scale=self.cfg.crop_scale,
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )

    def _view_is_fixed(self) -> bool:
        """Whether the training view is the whole image resized, plus flips: the crop of
        `RandomResizedCrop` at scale (1, 1) is the whole image (the aspect ratio cannot change
        without losing area), and no augmentation changes the pixels."""
        cfg = self.cfg
        return tuple(cfg.crop_scale) == (1.0, 1.0) and cfg.randaug_ops == 0 and cfg.reprob == 0

    def _decoded_once(self) -> torch.utils.data.TensorDataset:
        """The training split as one uint8 (N, 3, S, S) tensor of the resized images and
        their class indices, decoded by the loader's workers (the crop is the whole image)."""
        decoded = datasets.classification_dataset(self.cfg.data, "train", self._crop())
        loader = torch.utils.data.DataLoader(
            decoded, batch_size=256, num_workers=self.cfg.loader_workers
        )
        images, targets = zip(*loader, strict=True)
        return torch.utils.data.TensorDataset(torch.cat(images), torch.cat(targets))

    def _batch_view(self, images: torch.Tensor) -> torch.Tensor:
        """The training view's flips and normalisation on a uint8 batch, one draw per image."""
        cfg = self.cfg
        for p, dim in ((cfg.hflip, -1), (cfg.vflip, -2)):
            if p > 0:
                flip = (torch.rand(len(images)) < p).view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(dim), images)
        return normalize(images, IMAGENET_MEAN, IMAGENET_STD, "cpu")

    def _mixup(self):
        cfg, k = self.cfg, len(self.labels)
        choices = []
        if cfg.mixup > 0:
            choices.append(T.MixUp(alpha=cfg.mixup, num_classes=k))
        if cfg.cutmix > 0:
            choices.append(T.CutMix(alpha=cfg.cutmix, num_classes=k))
        if not choices or cfg.mixup_prob <= 0:
            return None
        return T.RandomApply([T.RandomChoice(choices)], p=cfg.mixup_prob)

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(
            cfg.arch,
            num_classes=len(self.labels),
            drop_path_rate=cfg.drop_path,
            layer_scale_init_value=cfg.layer_scale,
            head_init_scale=cfg.head_init_scale if not cfg.init else 0.001,
        )
        _load_init(model, cfg)
        return model

    collate = None  # the default collate stacks images and class indices

    def loss(self, model: nn.Module, batch, device) -> tuple[torch.Tensor, dict, int]:
        images, targets = batch
        if images.dtype == torch.uint8:  # decoded once: the view is applied here
            images = self._batch_view(images)
        k = len(self.labels)
        if self.mixup is not None:
            images, soft = self.mixup(images, targets)
        else:
            soft = F.one_hot(targets, k).float()
        soft = soft * (1 - self.cfg.smoothing) + self.cfg.smoothing / k
        images = images.to(device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images)
        loss = torch.sum(-soft.to(device) * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return loss, {"loss": loss.detach()}, len(targets)

    def evaluate(self, model: nn.Module, device) -> dict[str, float]:
        loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=64, num_workers=self.cfg.loader_workers
        )
        return evaluate_classifier(model, loader, IMAGENET_MEAN, IMAGENET_STD, device)

    def meta(self, metrics: dict, provenance: dict) -> CheckpointMeta:
        return CheckpointMeta(
            task="classify",
            arch=self.cfg.arch,
            head="linear",
            num_classes=len(self.labels),
            labels=self.labels,
            image_size=self.image_size,
            crop_pct=self.cfg.crop_pct,
            interpolation=self.cfg.interpolation,
            provenance=Provenance(source="trained", metrics=metrics, **provenance),
        )


def _detection_collate(batch):
    return tuple(zip(*batch, strict=True))


class DetectTask:
    primary = "bbox_AP"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.loader_workers = cfg.loader_workers
        self.min_size = cfg.min_size or 800
        self.max_size = cfg.max_size or DETECT_MAX_SIZE
        train_view = T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                T.SanitizeBoundingBoxes(),
            ]
        )
        self.train_set = datasets.detection_dataset(cfg.data, "train", train_view)
        self.val_set = datasets.detection_dataset(cfg.data, "val")
        self.labels = self.train_set.category_names
        # COCO category ids -> contiguous 1..K (0 is the detector's background)
        self.contiguous = {c: i + 1 for i, c in enumerate(self.train_set.category_ids)}
        # multi-scale training: short sides from 0.6x (min_size_low) to 1x of min_size, in
        # steps of 32
        low = max(32, int(cfg.min_size_low * self.min_size) // 32 * 32)
        self.train_scales = tuple(sorted({*range(low, self.min_size, 32), self.min_size}))
        # what inference depends on, stored in the checkpoint
        self.model_kwargs: dict = {"min_size": self.min_size, "max_size": self.max_size}
        for width in ("fpn_channels", "box_head_dim", "mask_head_dim"):  # None: the paper's
            if getattr(cfg, width) is not None:
                self.model_kwargs[width] = getattr(cfg, width)
        if cfg.roi_align != "torchvision":
            self.model_kwargs["roi_align"] = cfg.roi_align
        # torchvision's default (1000) needs no entry; small images want fewer proposals
        if cfg.rpn_test_proposals != TrainConfig.model_fields["rpn_test_proposals"].default:
            self.model_kwargs |= {
                "rpn_pre_nms_top_n_test": cfg.rpn_test_proposals,
                "rpn_post_nms_top_n_test": cfg.rpn_test_proposals,
            }

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(
            cfg.arch,
            num_classes=len(self.labels),
            drop_path_rate=cfg.drop_path,
            **self.model_kwargs,
            box_batch_size_per_image=cfg.roi_batch_size,
            box_positive_fraction=cfg.roi_positive_fraction,
            rpn_pre_nms_top_n_train=cfg.rpn_train_proposals,
            rpn_post_nms_top_n_train=cfg.rpn_train_proposals,
        )
        _load_init(model, cfg)
        return model

    collate = staticmethod(_detection_collate)

    def loss(self, model: nn.Module, batch, device) -> tuple[torch.Tensor, dict, int]:
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [
            {
                "boxes": t["boxes"].to(device),
                "labels": torch.tensor(
                    [self.contiguous[int(c)] for c in t["labels"]], dtype=torch.int64, device=device
                ),
                "masks": t["masks"].to(device),
            }
            for t in targets
        ]
        inner = model.module if hasattr(model, "module") else model
        inner.transform.min_size = self.train_scales
        try:
            parts = model(images, targets)
        finally:
            inner.transform.min_size = (self.min_size,)
        loss = sum(parts.values())
        return loss, {k: v.detach() for k, v in parts.items()}, len(images)

    def evaluate(self, model: nn.Module, device) -> dict[str, float]:
        return evaluate_detector(model, self.val_set)

    def meta(self, metrics: dict, provenance: dict) -> CheckpointMeta:
        return CheckpointMeta(
            task="detect",
            arch=self.cfg.arch,
            head="maskrcnn",
            num_classes=len(self.labels),
            labels=self.labels,
            image_size=self.min_size,
            crop_pct=1.0,
            interpolation="bilinear",
            provenance=Provenance(source="trained", metrics=metrics, **provenance),
            model_kwargs=self.model_kwargs,
        )


# pad crops with the mean colour, and their labels with the ignore index
PAD_FILL = {tv_tensors.Image: 124, tv_tensors.Mask: 255}


def _reduce_zero_label(image, mask):
    """ADE20K's convention: label 0 ('other') is ignored, classes shift down by one."""
    mask = mask.clone()
    mask[mask == 0] = 256
    return image, tv_tensors.Mask(mask - 1)


class SegmentTask:
    primary = "mIoU"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.loader_workers = cfg.loader_workers
        self.image_size = s = cfg.image_size or 512
        lo, hi = max(8, round(s * cfg.scale_range[0])), max(8, math.ceil(s * cfg.scale_range[1]))
        # the short side to a random size in [lo, hi]; a range of one size (1, 1) is a plain resize
        resize = T.RandomResize(lo, hi + 1) if hi > lo else T.Resize(lo)
        steps = [_reduce_zero_label] if cfg.reduce_zero_label else []
        train_view = T.Compose(
            [
                *steps,
                resize,
                T.RandomCrop(s, pad_if_needed=True, fill=PAD_FILL),
                T.RandomHorizontalFlip(),
                T.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            ]
        )
        self.train_set = datasets.segmentation_dataset(cfg.data, "training", train_view)
        val_view = T.Compose(steps) if steps else None
        self.val_set = datasets.segmentation_dataset(cfg.data, "validation", val_view)
        self.labels = self.train_set.labels[1:] if cfg.reduce_zero_label else self.train_set.labels
        # build arguments the tensors depend on, stored in the checkpoint to rebuild the model
        self.model_kwargs = {"channels": cfg.decode_channels} if cfg.decode_channels else {}

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(
            cfg.arch,
            num_classes=len(self.labels),
            drop_path_rate=cfg.drop_path,
            **self.model_kwargs,
        )
        _load_init(model, cfg)
        return model

    collate = None

    def loss(self, model: nn.Module, batch, device) -> tuple[torch.Tensor, dict, int]:
        images, masks = batch
        images = images.to(device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        parts = model(images, masks.to(device).long())
        loss = sum(parts.values())
        return loss, {k: v.detach() for k, v in parts.items()}, len(images)

    def evaluate(self, model: nn.Module, device) -> dict[str, float]:
        return evaluate_segmenter(model, self.val_set, self.image_size, len(self.labels))

    def meta(self, metrics: dict, provenance: dict) -> CheckpointMeta:
        return CheckpointMeta(
            task="segment",
            arch=self.cfg.arch,
            head="upernet",
            num_classes=len(self.labels),
            labels=self.labels,
            image_size=self.image_size,
            crop_pct=1.0,
            interpolation="bilinear",
            provenance=Provenance(source="trained", metrics=metrics, **provenance),
            model_kwargs=self.model_kwargs,
        )


TRAINING_TASKS = {"classify": ClassifyTask, "detect": DetectTask, "segment": SegmentTask}
