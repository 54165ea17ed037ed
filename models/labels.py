"""Class names: ImageNet-1K (shipped with torchvision) and user label files."""

from __future__ import annotations

import json
from pathlib import Path


def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1K category names, in class-id order, as torchvision ships them."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


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
