"""convnext-serve model library: ConvNeXt architectures, checkpoints, data and training.

Nothing here imports `service`: the serving side builds on this package, never the reverse.
"""

from . import cascade, convnext, detection, segmentation  # noqa: F401  (register the architectures)
from .checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from .convert import convert_checkpoint
from .registry import build_model, list_models

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "build_model",
    "convert_checkpoint",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
