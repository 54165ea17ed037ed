"""Real images that ship with a package: scikit-learn's 1,797 handwritten digits (8 x 8 px,
UCI), written as an ImageFolder dataset, every fifth image in val."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / ("val" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8), "L").save(folder / f"{i}.png")
    return root
