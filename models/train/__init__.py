"""Training library: the paper's recipe for classification, Mask R-CNN and UperNet training.

`train(cfg)` runs one training run described by a `TrainConfig` (locally, or with Ray Train
when `cfg.num_workers > 1`) and writes the served checkpoint `cfg.out`.
"""

from .config import TrainConfig
from .loop import fit


def train(cfg: TrainConfig) -> dict:
    """Train and write `cfg.out`; returns the final validation metrics."""
    if cfg.num_workers > 1:
        from .distributed import fit_with_ray

        return fit_with_ray(cfg)
    return fit(cfg)


__all__ = ["TrainConfig", "fit", "train"]
