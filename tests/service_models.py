"""Small trained checkpoints for the service tests, made with the project's training library.

Trained once on the colour-shapes data (`colour_shapes.py`) and cached under
`$CONVNEXT_SERVE_TEST_CACHE` (default ~/.cache/convnext-serve/test-models), keyed by a hash of
the recipes and the data generator, so a repeated local run starts at once and a fresh CI
machine trains them (about six minutes on two cores, most of it the detector). Each reaches
what the service tests assert with at least 0.1 to spare (docs/testing.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from models.checkpoint import META_KEY
from models.train import TrainConfig, train

from . import colour_shapes

COMMON = dict(
    progress=False, loader_workers=0, warmup_epochs=0.3, drop_path=0.0, ema_decay=0.0, seed=0
)
RECIPES = {
    "classify": (
        colour_shapes.write_classify,
        300,
        dict(
            arch="convnext_atto",
            epochs=2,
            batch_size=16,
            image_size=48,
            lr=2e-3,
            mixup=0.0,
            cutmix=0.0,
            randaug_ops=0,
            reprob=0.0,
            crop_scale=(0.6, 1.0),
        ),
    ),
    # Narrow RoI heads: at the paper's widths they take 4/5 of a step on 64-px images. More
    # images beat more epochs: 400 x 6 reaches a better detector than 200 x 12.
    "detect": (
        colour_shapes.write_detect,
        400,
        dict(
            arch="maskrcnn_convnext_atto",
            epochs=6,
            batch_size=4,
            min_size=64,
            max_size=64,
            lr=1e-3,
            roi_batch_size=64,
            roi_positive_fraction=0.5,
            rpn_train_proposals=200,
            rpn_test_proposals=100,
            fpn_channels=64,
            box_head_dim=256,
            mask_head_dim=64,
        ),
    ),
    # A 128-channel decoder: at 512 its 3x3 fusion conv over 2048 channels took the time.
    "segment": (
        colour_shapes.write_segment,
        400,
        dict(
            arch="upernet_convnext_atto",
            epochs=4,
            batch_size=8,
            image_size=64,
            lr=1e-3,
            scale_range=(0.75, 1.5),
            decode_channels=128,
        ),
    ),
}


def _fingerprint() -> str:
    """Changes when a recipe or the data generator changes (CI always starts empty)."""
    recipes = {task: (write.__name__, n, recipe) for task, (write, n, recipe) in RECIPES.items()}
    digest = hashlib.sha256(json.dumps(recipes, sort_keys=True).encode())
    digest.update((Path(__file__).resolve().parent / "colour_shapes.py").read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    default = Path.home() / ".cache" / "convnext-serve" / "test-models"
    return Path(os.environ.get("CONVNEXT_SERVE_TEST_CACHE", default))


def cache_dir() -> Path:
    return cache_root() / _fingerprint()


def checkpoint_paths() -> list[Path]:
    return [cache_dir() / f"{task}.safetensors" for task in RECIPES]


def service_checkpoints() -> dict[str, Path]:
    """{task: checkpoint path}, training whatever is not cached yet (or waiting for the
    test run's background training to make it: `background_training`)."""
    from .background_training import wait_for

    wait_for("service")
    folder = cache_dir()
    paths = {}
    for task, (write, n, recipe) in RECIPES.items():
        out = folder / f"{task}.safetensors"
        paths[task] = out
        if out.is_file():
            continue
        data = folder / "data" / task
        shutil.rmtree(data, ignore_errors=True)
        write(data, n)
        tmp = folder / "partial" / f"{task}.safetensors"
        init = {} if task == "classify" else {"init": str(paths["classify"])}  # pre-trained
        train(TrainConfig.for_task(task, data=str(data), out=str(tmp), **COMMON, **recipe, **init))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return paths


def relabelled(source: Path, target: Path, rename: Callable[[str], str]) -> Path:
    """A copy of a checkpoint whose labels are renamed: the same model, answering in other
    words (a second version that shows which version answered)."""
    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        metadata = f.metadata()
    meta = json.loads(metadata[META_KEY])
    meta["labels"] = [rename(label) for label in meta["labels"]]
    save_file(tensors, str(target), metadata={**metadata, META_KEY: json.dumps(meta)})
    return target
