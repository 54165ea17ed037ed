"""UperNet on ConvNeXt (the paper's ADE20K setup): mmseg's UPerHead plus the auxiliary FCN head.

`build_model("upernet_convnext_tiny", num_classes=150)`. Images go in as float RGB in [0, 1]; the
model normalises them itself. In training, `forward(images, targets)` returns the losses (cross
entropy of the decode head, plus 0.4 x the auxiliary head's on stage 3); in eval it returns
logits at the input's size. `segment` is the inference API: uint8 images of any sizes in, one
class-id map per image at its own (or a requested) size out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import IMAGENET_MEAN, IMAGENET_STD
from .convnext import CONVNEXT_CONFIGS, ConvNeXt
from .images import padded_size_groups, to_float_images
from .presets import SEGMENT_LONG_SIDE_FACTOR
from .registry import register_model


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule as UperNet uses it: conv without bias, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """Pyramid pooling (scales 1, 2, 3, 6) on the last stage, 1x1 laterals, a top-down path,
    3x3 FPN convs, all levels fused at 1/4 resolution, dropout, 1x1 classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        *low, last = in_channels
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(last, channels, 1))
            for s in pool_scales
        )
        self.bottleneck = ConvBNReLU(last + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in low)
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in low)
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        last = feats[-1]
        pooled = [_resize(p(last), last.shape[-2:]) for p in self.ppm]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([last, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head on stage 3 (training only): 3x3 conv, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout=0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.conv(x)))


class UperNet(nn.Module):
    """ConvNeXt backbone + UPerHead (+ auxiliary FCN head for training)."""

    def __init__(
        self,
        backbone: ConvNeXt,
        num_classes: int,
        channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.out_channels, num_classes, channels)
        self.auxiliary_head = FCNHead(backbone.out_channels[2], num_classes, aux_channels)
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits at 1/4 of the input resolution (images float in [0, 1])."""
        feats = self.backbone((images - self.mean) / self.std)
        return self.decode_head(feats)

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if targets is None:
            return _resize(self.forward_logits(images), images.shape[-2:])
        feats = self.backbone((images - self.mean) / self.std)
        size = targets.shape[-2:]
        logits = _resize(self.decode_head(feats), size)
        aux = _resize(self.auxiliary_head(feats[2]), size)
        ce = dict(ignore_index=self.ignore_index)
        return {
            "loss_seg": F.cross_entropy(logits, targets, **ce),
            "loss_aux": self.aux_weight * F.cross_entropy(aux, targets, **ce),
        }


def upernet_convnext(
    arch: str,
    num_classes: int = 150,
    drop_path_rate: float = 0.0,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    **kw,
) -> UperNet:
    depths, dims = CONVNEXT_CONFIGS[arch]
    backbone = ConvNeXt(depths=depths, dims=dims, drop_path_rate=drop_path_rate, features_only=True)
    return UperNet(backbone, num_classes, image_mean=image_mean, image_std=image_std, **kw)


def _register(arch: str) -> None:
    def build(num_classes: int = 150, **kw) -> UperNet:
        return upernet_convnext(arch, num_classes=num_classes, **kw)

    build.__doc__ = f"UperNet, {arch} backbone."
    register_model(f"upernet_{arch}", task="segment")(build)


for _arch in CONVNEXT_CONFIGS:
    _register(_arch)


# --- inference -----------------------------------------------------------------------------

STRIDE = 32  # inputs are padded to a multiple of the backbone's total stride


def _resized_hw(h: int, w: int, short: int, max_long: int) -> tuple[int, int]:
    """Short side to `short`, keeping the aspect ratio, long side at most `max_long` (mmseg)."""
    scale = min(short / min(h, w), max_long / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def argmax_at_size(
    logits: torch.Tensor, valid: tuple[float, float], out_hw: tuple[int, int], max_elems=1 << 24
) -> torch.Tensor:
    """Class ids (H, W) from low-resolution logits (C, h, w), resized bilinearly before argmax.

    `valid` is the fraction (rows, cols) of the logits that covers the image (the rest is
    padding). The resize is one `grid_sample` per tile of at most `max_elems` logits, so a
    40-megapixel image (or a 1 x 40,000,000 strip) never holds C full-size float planes at
    once; with no padding it equals `F.interpolate(mode="bilinear", align_corners=False)`.
    """
    c = logits.shape[0]
    out_h, out_w = out_hw
    dev = logits.device
    # Output pixel centres -> normalised coordinates of the padded logits map.
    gx = (torch.arange(out_w, device=dev) + 0.5) * (2 * valid[1] / out_w) - 1
    gy = (torch.arange(out_h, device=dev) + 0.5) * (2 * valid[0] / out_h) - 1
    cols = max(1, min(out_w, max_elems // max(1, c)))
    rows = max(1, max_elems // max(1, c * cols))
    out = torch.empty(out_h, out_w, dtype=torch.int64, device=dev)
    src = logits[None].float()
    for r0 in range(0, out_h, rows):
        for c0 in range(0, out_w, cols):
            y, x = gy[r0 : r0 + rows], gx[c0 : c0 + cols]
            grid = torch.stack(torch.meshgrid(y, x, indexing="ij")[::-1], dim=-1)[None]
            tile = F.grid_sample(
                src, grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            out[r0 : r0 + rows, c0 : c0 + cols] = tile[0].argmax(0)
    return out


@torch.inference_mode()
def segment(
    model: UperNet,
    images: Sequence[torch.Tensor],
    image_size: int = 512,
    output_sizes: Sequence[tuple[int, int]] | None = None,
    mode: str = "whole",
    max_long_side: int | None = None,
) -> list[torch.Tensor]:
    """Class-id maps (H, W) int64 for a batch of uint8 RGB images (3, H, W) of any sizes.

    Each image is resized so its short side is `image_size` (long side at most
    `max_long_side`, default 4x), normalised on the model's device, padded to a common
    multiple of 32 and run as one batch (`mode="whole"`), or in overlapping `image_size`
    windows with a stride of 2/3 of it (`mode="slide"`, for images much larger than the
    training crop). Logits are resized to `output_sizes[i]` (default: the image's own size)
    before the argmax. Images run together when they pad to the same size, so an image's map
    does not depend on what it was batched with.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', not {mode!r}")
    device = next(model.parameters()).device
    max_long = max_long_side or SEGMENT_LONG_SIDE_FACTOR * image_size
    sizes = output_sizes or [tuple(img.shape[-2:]) for img in images]
    resized = []
    for img in to_float_images(images, device):
        hw = _resized_hw(*img.shape[-2:], image_size, max_long)
        resized.append(_resize(img[None], hw)[0] if hw != tuple(img.shape[-2:]) else img)
    if mode == "whole":  # images that pad to the same size run together (see the helper)
        maps: list[torch.Tensor] = [torch.empty(0)] * len(resized)
        for group in padded_size_groups([img.shape[-2:] for img in resized], STRIDE):
            batch, (ph, pw) = _pad_batch([resized[i] for i in group], model.mean.view(3, 1, 1))
            for i, logits in zip(group, model.forward_logits(batch), strict=True):
                fit = (resized[i].shape[-2] / ph, resized[i].shape[-1] / pw)
                maps[i] = argmax_at_size(logits, fit, sizes[i])
        return maps
    out = []
    for img, size in zip(resized, sizes, strict=True):
        logits, fit = _slide_logits(model, img, image_size)
        out.append(argmax_at_size(logits, fit, size))
    return out


def _pad_batch(
    images: Sequence[torch.Tensor], fill: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Stack images top-left aligned, padded with the mean colour (zero after normalisation)."""
    ph = math.ceil(max(i.shape[-2] for i in images) / STRIDE) * STRIDE
    pw = math.ceil(max(i.shape[-1] for i in images) / STRIDE) * STRIDE
    batch = fill.expand(len(images), 3, ph, pw).clone()
    for b, img in zip(batch, images, strict=True):
        b[:, : img.shape[-2], : img.shape[-1]] = img
    return batch, (ph, pw)


def _slide_logits(
    model: UperNet, image: torch.Tensor, crop: int
) -> tuple[torch.Tensor, tuple[float, float]]:
    """Average the 1/4-resolution logits of overlapping crop windows (mmseg's slide mode).

    Window offsets are multiples of 32, so every window's logits land exactly on the
    1/4-resolution grid of the whole padded image.
    """
    crop = math.ceil(crop / STRIDE) * STRIDE
    stride = max(STRIDE, (crop * 2 // 3) // STRIDE * STRIDE)
    h, w = image.shape[-2:]
    ph = max(crop, math.ceil(h / STRIDE) * STRIDE)
    pw = max(crop, math.ceil(w / STRIDE) * STRIDE)
    canvas = model.mean.view(1, 3, 1, 1).expand(1, 3, ph, pw).clone()
    canvas[..., :h, :w] = image
    total = torch.zeros(model.num_classes, ph // 4, pw // 4, device=image.device)
    count = torch.zeros(1, ph // 4, pw // 4, device=image.device)
    ys = [*range(0, ph - crop, stride), ph - crop]
    xs = [*range(0, pw - crop, stride), pw - crop]
    windows = [(y, x) for y in ys for x in xs]
    for i in range(0, len(windows), 8):  # a few windows per forward pass
        chunk = windows[i : i + 8]
        batch = torch.cat([canvas[..., y : y + crop, x : x + crop] for y, x in chunk])
        for lg, (y, x) in zip(model.forward_logits(batch), chunk, strict=True):
            total[:, y // 4 : (y + crop) // 4, x // 4 : (x + crop) // 4] += lg.float()
            count[:, y // 4 : (y + crop) // 4, x // 4 : (x + crop) // 4] += 1
    return total / count, (h / ph, w / pw)
