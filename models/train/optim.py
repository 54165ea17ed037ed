"""AdamW parameter groups (weight decay and layer-wise lr decay) and per-step lr schedules."""

from __future__ import annotations

import math
import re

from torch import nn

NUM_LAYERS = 12  # the official ConvNeXt layer-id scheme: stem 0 ... stage 4 -> 12, head 13


def layer_id(name: str, iso_depth: int | None = None) -> int:
    """The official ConvNeXt layer id of a parameter (facebookresearch `optim_factory.py`).

    Stem 0; stage 1 -> 1; stage 2 -> 2; stage 3 in groups of three blocks (3 + block // 3);
    stage 4 -> 12; downsampling layers go with the stage they feed; anything else (norms after
    the backbone, heads, FPN, decode heads) -> 13. Names may carry a prefix
    (`backbone.body.stages...` in Mask R-CNN). Isotropic models: stem 0, block i -> i + 1, rest
    depth + 1.
    """
    if iso_depth is not None:
        if m := re.search(r"(?:^|\.)blocks\.(\d+)\.", name):
            return int(m[1]) + 1
        return 0 if re.search(r"(?:^|\.)stem\.", name) else iso_depth + 1
    if m := re.search(r"(?:^|\.)downsample_layers\.(\d)\.", name):
        return {0: 0, 1: 2, 2: 3, 3: NUM_LAYERS}[int(m[1])]
    if m := re.search(r"(?:^|\.)stages\.(\d)\.(\d+)\.", name):
        stage, block = int(m[1]), int(m[2])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: NUM_LAYERS}[stage]
    return NUM_LAYERS + 1


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases and layer scale (every 1-D parameter) train without weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """AdamW groups: decay / no-decay, and with `layer_decay` an lr of
    `lr * layer_decay ** (max_id - layer_id)` per layer id (fine-tuning)."""
    iso_depth = len(model.blocks) if hasattr(model, "blocks") and hasattr(model, "stem") else None
    max_id = (iso_depth + 1) if iso_depth is not None else NUM_LAYERS + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, iso_depth) if layer_decay is not None else max_id
        decay = not no_weight_decay(name, p)
        scale = layer_decay ** (max_id - lid) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "layer_id": lid,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def warmup_cosine(step: int, total: int, warmup: int, min_factor: float = 0.0) -> float:
    """lr factor: linear warmup from 0 over `warmup` steps, then cosine to `min_factor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_poly(
    step: int, total: int, warmup: int, power: float = 1.0, min_factor: float = 0.0
) -> float:
    """lr factor: linear warmup, then polynomial decay (mmseg's UperNet schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1 - min_factor) * (1 - progress) ** power
