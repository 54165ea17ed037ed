"""Which classification recipe a dataset gets: the paper's, or one for small data.

The paper's recipe (TrainConfig's defaults) is for ImageNet: 1.28M images, 300 epochs, a peak
lr scaled from a 4096 batch, 20 warm-up epochs, Mixup/CutMix, RandAugment, erasing and an EMA
of decay 0.9999. On a couple of thousand images most of it works against learning: the scaled
lr is tiny, the warm-up is most of the run, the EMA never moves from the initial weights, and
Mixup/CutMix hide what little data there is. `small` is a from-scratch recipe for such data;
`auto` (the CLI's default) picks it below `SMALL_DATASET` training images and says so.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

SMALL_DATASET = 100_000  # training images: below this, `auto` picks the small-data recipe
RECIPES = ("auto", "paper", "small")


def dataset_shape(data: str | Path, sample: int = 64) -> tuple[int, int]:
    """(training images, median short side in pixels of an even sample of them) of an
    ImageFolder dataset; sizes come from the image headers."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what ImageFolder trains on

    files = sorted(
        p for p in (Path(data) / "train").rglob("*") if p.suffix.lower() in IMG_EXTENSIONS
    )
    if not files:
        return 0, 0
    step = max(1, len(files) // sample)
    sides = []
    for path in files[::step][:sample]:
        with Image.open(path) as image:
            sides.append(min(image.size))
    return len(files), int(statistics.median(sides))


def small_data_recipe(epochs: int, short_side: int) -> dict[str, Any]:
    """TrainConfig values for training from scratch on a small dataset."""
    return {
        "batch_size": 64,  # more steps per epoch
        "lr": 2e-3,  # not scaled down from a 4096 batch
        "warmup_epochs": max(1.0, epochs / 20),
        "mixup": 0.0,
        "cutmix": 0.0,
        "randaug_magnitude": 5,
        "reprob": 0.0,
        # a crop of a third of a small image cuts away what defines it (8 px digits: top-1
        # 0.953 with crops from 0.35 of the area, 0.989 from 0.6)
        "crop_scale": (0.6, 1.0) if short_side <= 64 else (0.35, 1.0),
        "ema_decay": 0.0,  # too few steps for an average to help
        # the model sees what the images have: their size, in multiples of 32, from 32 to 224
        "image_size": min(224, max(32, -(-short_side // 32) * 32)),
        "crop_pct": 1.0 if short_side <= 64 else 0.875,
    }


def choose_recipe(recipe: str, data: str | Path, epochs: int) -> tuple[str, dict[str, Any], str]:
    """(the recipe, its TrainConfig values, why) for a classification dataset."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {recipe!r}")
    if recipe == "paper":
        return "paper", {}, "asked for"
    n, side = dataset_shape(data)
    if recipe == "small" or n < SMALL_DATASET:
        why = (
            f"{n:,} training images, {side} px short side (median)"
            if recipe == "auto"
            else "asked for"
        )
        return "small", small_data_recipe(epochs, side), why
    return "paper", {}, f"{n:,} training images"
