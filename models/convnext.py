"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022), as in the official code.

State dict keys follow facebookresearch/ConvNeXt (`downsample_layers.0.0.weight`,
`stages.0.0.dwconv.weight`, `stages.0.0.gamma`, `norm.weight`, `head.weight`), so official
checkpoints load without renaming. Every LayerNorm permutes to NHWC and back: for a
`channels_last` tensor those permutes are free views, so a channels_last input runs end to end
without layout copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from .cpu import fused_linear, fused_linear_works
from .registry import register_model

# name: (depths, dims) — paper Table 2.1 (T/S/B/L/XL) plus timm's small CPU variants.
CONVNEXT_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

# name: (depth, dim, layer_scale_init_value) — paper section 3.3; the official isotropic S/B
# train without layer scale, L with it.
ISOTROPIC_CONFIGS: dict[str, tuple[int, int, float]] = {
    "convnext_iso_small": (18, 384, 0.0),
    "convnext_iso_base": (18, 768, 0.0),
    "convnext_iso_large": (36, 1024, 1e-6),
}


def _fused_mlp_dtype(y: torch.Tensor) -> torch.dtype | None:
    """The dtype for the fused oneDNN MLP, or None to run the plain modules.

    Only CPU inference (no autograd), eager (Inductor picks its own kernels), in fp32, bf16 or
    under bf16 autocast, and only where the kernel works on this CPU (`cpu.fused_linear_works`).
    In fp32 it is faster than ATen's addmm (MKL's sgemm); under bf16 autocast the fused GELU also
    saves the casts and the separate GELU pass that autocast's per-op kernels pay.
    """
    if y.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else y.dtype
    return dtype if fused_linear_works(dtype) else None


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (the official `channels_first` LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """7x7 depthwise conv, LayerNorm, Linear 4x, GELU, Linear, layer scale, drop path."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), layer_scale_init_value))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # NHWC: a view for channels_last x
        dtype = _fused_mlp_dtype(y)
        if dtype is not None:
            fc1, fc2 = self.pwconv1, self.pwconv2
            y = fused_linear(y.to(dtype), fc1.weight.to(dtype), fc1.bias.to(dtype), gelu=True)
            y = fused_linear(y, fc2.weight.to(dtype), fc2.bias.to(dtype), gelu=False)
        else:
            y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.drop_path is None and self.gamma is not None:
            # x + gamma * y in one fused kernel, computed in the NHWC view of x.
            return torch.addcmul(x.permute(0, 2, 3, 1), y, self.gamma).permute(0, 3, 1, 2)
        if self.gamma is not None:
            y = y * self.gamma
        y = y.permute(0, 3, 1, 2)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return x + y


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _make_head(num_features: int, num_classes: int, head_init_scale: float) -> nn.Module:
    """The classifier: truncated-normal init scaled by `head_init_scale` (0.001 to fine-tune)."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    _init_weights(head)
    with torch.no_grad():
        head.weight.mul_(head_init_scale)
        head.bias.mul_(head_init_scale)
    return head


class _ClassifierMixin:
    """The classification head API shared by both ConvNeXt families (as in timm)."""

    num_features: int
    norm: nn.LayerNorm
    head: nn.Module

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool -> LayerNorm -> classifier (or the pooled features)."""
        x = self.norm(x.mean((-2, -1)))
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int, head_init_scale: float = 1.0) -> None:
        """A fresh head for fine-tuning on another label set."""
        self.head = _make_head(self.num_features, num_classes, head_init_scale)


class ConvNeXt(_ClassifierMixin, nn.Module):
    """Hierarchical ConvNeXt.

    With `features_only=True` it is the dense-prediction backbone of the official detection and
    segmentation code: no pooling or head, and each stage in `out_indices` gets its own
    LayerNorm (`norm0` ... `norm3`); `forward` then returns those feature maps (strides 4..32).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        features_only: bool = False,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
    ):
        super().__init__()
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.num_features = dims[-1]
        self.features_only = features_only
        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims, strict=True):
            blocks = [Block(dim, rates[start + j], layer_scale_init_value) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            start += depth
        self.feature_info = [
            {"num_chs": dim, "reduction": 4 * 2**i, "module": f"stages.{i}"}
            for i, dim in enumerate(dims)
        ]
        if features_only:
            self.out_indices = tuple(out_indices)
            self.out_channels = [dims[i] for i in self.out_indices]
            for i in self.out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))
        else:
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.apply(_init_weights)
        if not features_only:
            self.head = _make_head(dims[-1], num_classes, head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, C, H/32, W/32), before pooling."""
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The normed outputs of the stages in `out_indices` (features_only models)."""
        outs = []
        for i, (downsample, stage) in enumerate(
            zip(self.downsample_layers, self.stages, strict=True)
        ):
            x = stage(downsample(x))
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_stages(x)
        return self.forward_head(self.forward_features(x))


class ConvNeXtIsotropic(_ClassifierMixin, nn.Module):
    """Isotropic ConvNeXt (paper section 3.3): 16x16 patchify stem, one resolution throughout."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depth: int = 18,
        dim: int = 384,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 0.0,
        head_init_scale: float = 1.0,
    ):
        super().__init__()
        self.num_features = dim
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=16, stride=16)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[Block(dim, r, layer_scale_init_value) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)
        self.head = _make_head(dim, num_classes, head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _register_hierarchical(name: str, depths: tuple[int, ...], dims: tuple[int, ...]) -> None:
    def build(num_classes: int = 1000, **kw) -> ConvNeXt:
        return ConvNeXt(num_classes=num_classes, depths=depths, dims=dims, **kw)

    build.__doc__ = f"{name}: depths {depths}, dims {dims}."
    register_model(name, task="classify")(build)


def _register_isotropic(name: str, depth: int, dim: int, layer_scale: float) -> None:
    def build(num_classes: int = 1000, **kw) -> ConvNeXtIsotropic:
        kw.setdefault("layer_scale_init_value", layer_scale)
        return ConvNeXtIsotropic(num_classes=num_classes, depth=depth, dim=dim, **kw)

    build.__doc__ = f"{name}: {depth} blocks of dim {dim}."
    register_model(name, task="classify")(build)


for _name, (_depths, _dims) in CONVNEXT_CONFIGS.items():
    _register_hierarchical(_name, _depths, _dims)
for _name, (_depth, _dim, _ls) in ISOTROPIC_CONFIGS.items():
    _register_isotropic(_name, _depth, _dim, _ls)
