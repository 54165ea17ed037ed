"""Training configuration: the paper's recipe as defaults (Table 2.5), every knob a field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """One training run. Defaults are the paper's ImageNet-1K recipe for classification;
    `for_task` swaps in the detection (Mask R-CNN) and segmentation (UperNet) defaults."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["classify", "detect", "segment"]
    data: str
    arch: str
    out: str
    recipe: Literal["auto", "paper", "small"] = Field(
        "paper",
        description="classify: the paper's ImageNet recipe, or one for small data (below "
        "100,000 images); auto picks by the dataset's size (the CLI's default). Values given "
        "explicitly win over the recipe's",
    )
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1, description="per process")
    accum_steps: int = Field(1, ge=1)
    lr: float | None = Field(
        None, description="absolute peak lr; default: 4e-3 x batch / 4096 (classify), 1e-4 dense"
    )
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05
    image_size: int | None = Field(
        None, ge=32, description="at least the backbone's stride (a checkpoint refuses less)"
    )
    # model
    drop_path: float = 0.1
    layer_scale: float = 1e-6
    head_init_scale: float = 1.0
    init: str | None = None
    layer_decay: float | None = None
    # classification augmentation and regularisation
    hflip: float = Field(
        0.5, ge=0.0, le=1.0, description="horizontal flip probability (0 for digits, text)"
    )
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="vertical flip probability")
    randaug_ops: int = 2
    randaug_magnitude: int = 9
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    reprob: float = 0.25
    smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    # dense
    min_size: int | None = None
    max_size: int | None = None
    min_size_low: float = Field(
        0.6, gt=0.0, le=1.0, description="detection: multi-scale short sides from this x min_size"
    )
    scale_range: tuple[float, float] = (0.5, 2.0)
    reduce_zero_label: bool = False
    decode_channels: int | None = Field(
        None, ge=8, description="UperNet decode-head width; default 512 (mmseg's, any backbone)"
    )
    fpn_channels: int | None = Field(
        None, ge=8, description="Mask R-CNN FPN width; default 256 (the paper's)"
    )
    box_head_dim: int | None = Field(
        None, ge=8, description="Mask R-CNN box head fc width; default 1024 (the paper's)"
    )
    mask_head_dim: int | None = Field(
        None, ge=8, description="Mask R-CNN mask head conv width; default 256 (the paper's)"
    )
    roi_align: Literal["torchvision", "mmdet"] = Field(
        "torchvision",
        description="Mask R-CNN RoIAlign: torchvision's (2 samples a bin), or mmdet's, as the "
        "paper's weights were trained (aligned, adaptive sampling: fewer samples for small RoIs)",
    )
    roi_batch_size: int = Field(512, ge=1, description="RoIs sampled per image (Mask R-CNN)")
    rpn_train_proposals: int = Field(2000, ge=1, description="RPN proposals kept in training")
    roi_positive_fraction: float = Field(
        0.25, gt=0.0, le=1.0, description="most a sampled RoI batch may hold of positives"
    )
    rpn_test_proposals: int = Field(
        1000, ge=1, description="RPN proposals per image at inference (stored in the checkpoint)"
    )
    # running
    ema_decay: float = 0.9999
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True
    loader_workers: int = 2
    seed: int = 0
    max_steps_per_epoch: int | None = None
    progress: bool = True
    state_dir: str | None = None
    resume: str | None = None
    # scale-out (Ray Train)
    num_workers: int = 0
    gpus_per_worker: float = 0.0
    address: str | None = None
    placement: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="Ray Train workers on as few nodes as fit (PACK) or one a node (SPREAD)",
    )

    @classmethod
    def for_task(cls, task: str, **kw) -> TrainConfig:
        """Task defaults, then the caller's values (None means: keep the default)."""
        defaults: dict = {}
        if task == "detect":
            defaults = dict(
                epochs=36,
                batch_size=2,
                warmup_epochs=1,
                drop_path=0.2,
                min_size=800,
                max_size=1333,
                ema_decay=0.0,
            )
        elif task == "segment":
            defaults = dict(
                epochs=160,
                batch_size=2,
                warmup_epochs=1,
                drop_path=0.2,
                image_size=512,
                ema_decay=0.0,
            )
        given = {k: v for k, v in kw.items() if v is not None}
        return cls(task=task, **{**defaults, **given})

    def peak_lr(self, world_size: int = 1) -> float:
        if self.lr is not None:
            return self.lr
        if self.task == "classify":
            return 4e-3 * self.batch_size * self.accum_steps * world_size / 4096
        return 1e-4
