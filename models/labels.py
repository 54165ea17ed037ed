"""Class names: ImageNet-1K (shipped with torchvision) and user label files."""

from __future__ import annotations

import json
from pathlib import Path


def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1K category names, in class-id order, as torchvision ships them (its
    weights' metadata: nothing is downloaded)."""
    from torchvision.models import ConvNeXt_Tiny_Weights

    return list(ConvNeXt_Tiny_Weights.IMAGENET1K_V1.meta["categories"])


def coco_labels() -> list[str]:
    """The 80 COCO detection category names, in the contiguous order mmdet and torchvision's
    detectors use (torchvision's detector metadata, without its background and unused ids)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    categories = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [c for c in categories if c not in ("__background__", "N/A")]


# ADE20K's 150 classes (SceneParsing), in the order mmsegmentation's ADE20KDataset gives them.
ADE20K_LABELS = """
wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk,
person, earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf,
house, sea, mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub,
railing, cushion, base, box, column, signboard, chest of drawers, counter, sand, sink,
skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case, pool table, pillow,
screen door, stairway, river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill,
bench, countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar,
arcade machine, hovel, bus, towel, light, truck, tower, chandelier, awning, streetlight, booth,
television receiver, airplane, dirt track, apparel, pole, land, bannister, escalator, ottoman,
bottle, buffet, poster, stage, van, ship, fountain, conveyer belt, canopy, washer, plaything,
swimming pool, stool, barrel, basket, waterfall, tent, bag, minibike, cradle, oven, ball, food,
step, tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket,
sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate,
monitor, bulletin board, shower, radiator, glass, clock, flag
"""


def ade20k_labels() -> list[str]:
    """The 150 ADE20K class names (mmsegmentation's order: its class 0 is wall)."""
    return [name.strip() for name in ADE20K_LABELS.replace("\n", " ").split(",")]


def read_labels_file(path: str | Path) -> list[str]:
    """Labels from a JSON list or a text file with one name per line (blank lines skipped)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        labels = json.loads(text)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{path}: a JSON labels file must hold a list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def default_labels(num_classes: int) -> list[str]:
    """ImageNet-1K names for 1000 classes, else `class_<i>` placeholders."""
    if num_classes == 1000:
        return imagenet1k_labels()
    return [f"class_{i}" for i in range(num_classes)]
