"""The demo models `convnext-serve run` serves out of the box, trained on synthetic shapes.

Three recipes, each a `convnext-serve train` run with a fixed seed on a `data synth` dataset:
a ConvNeXt-atto classifier, then Mask R-CNN whose backbone starts from it (the paper's
pre-train -> fine-tune path), then UperNet whose backbone starts from the detector's.
`build_demo_models` makes whichever are missing, so the first `make run` on a fresh machine
trains them once (with progress bars) and later runs start at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError, read_checkpoint_meta
from .train.progress import progress_path, write_progress

SEED = 0

# task: (synth arguments, train arguments), in training order; DEMO_INIT says what each starts from
DEMO_RECIPES: dict[str, tuple[dict, dict]] = {
    # ConvNeXt-atto from scratch on 20k shapes at 32 px (drawn 4x larger and shrunk, as a
    # served photo is). Half the shapes are large and central: from those alone the model
    # learns what a shape is; trained on the spread of sizes and places alone it stays at
    # chance for thousands of steps, and lr 3e-3 collapses it to one answer. The shapes are
    # the whole image, so the ImageNet recipe's crops, RandAugment, Mixup/CutMix and erasing
    # only slow it down, and with no crops the images are decoded once; flips are free. Label
    # smoothing stays; an EMA lags far behind in so few steps.
    "classify": (
        {"n": 20000, "n_val": 1000, "image_size": 32},
        {
            "arch": "convnext_atto",
            "epochs": 14,
            "batch_size": 64,
            "image_size": 32,
            "lr": 2e-3,
            "warmup_epochs": 1.5,
            "drop_path": 0.0,
            "ema_decay": 0.0,
            "mixup": 0.0,
            "cutmix": 0.0,
            "randaug_ops": 0,
            "reprob": 0.0,
            "smoothing": 0.1,
            "crop_scale": (1.0, 1.0),
            "crop_pct": 1.0,
            "vflip": 0.5,
        },
    ),
    # Mask R-CNN from the classifier's backbone. The paper's widths (FPN 256, box head 1024,
    # mask head 256) are for 80 COCO classes; for 4 shapes an eighth of the FPN and mask head
    # and a quarter of the box head learn as well at about a seventh of the CPU time a step
    # (the CPU's single-threaded RoIAlign backward scales with the FPN's width). Few proposals
    # keep a step cheap (the defaults are for 1333 px COCO images), and mmdet's RoIAlign (the
    # paper's) samples small RoIs less. 128 sampled RoIs an image, at most an eighth positive:
    # the negatives are what teach it that a star's point or a square's corner is no shape of
    # its own, nor the edge between two grounds; the mask head, which sees only the positives,
    # costs what it cost at 64 RoIs.
    "detect": (
        {"n": 2800, "n_val": 100, "image_size": 128},
        {
            "arch": "maskrcnn_convnext_atto",
            "epochs": 3,
            "batch_size": 8,
            "min_size": 128,
            "max_size": 128,
            "min_size_low": 1.0,
            "lr": 2e-3,
            "warmup_epochs": 0.1,
            "drop_path": 0.0,
            "roi_batch_size": 128,
            "roi_positive_fraction": 0.125,
            "rpn_train_proposals": 200,
            "rpn_test_proposals": 200,
            "layer_decay": 0.9,
            "fpn_channels": 32,
            "box_head_dim": 256,
            "mask_head_dim": 32,
            "roi_align": "mmdet",
            "ema_decay": 0.0,
        },
    ),
    # UperNet from the detector's backbone, already fine-tuned to these scenes. What it is
    # slow to learn is which shape a pixel belongs to (pixel accuracy is 0.95 when mIoU is
    # 0.5); with no rescaling (the val images are served at their own scale) and a higher lr
    # it learns that in half the epochs. A 64-channel decoder (the paper's is 512) learns it
    # as well as 128 at half the cost of a step: its 3x3 convs at 1/4 scale are most of one.
    "segment": (
        {"n": 2000, "n_val": 100, "image_size": 128},
        {
            "arch": "upernet_convnext_atto",
            "epochs": 5,
            "batch_size": 8,
            "image_size": 128,
            "lr": 4e-3,
            "warmup_epochs": 0.1,
            "drop_path": 0.0,
            "layer_decay": 0.9,
            "scale_range": (1.0, 1.0),
            "decode_channels": 64,
            "ema_decay": 0.0,
        },
    ),
}


# the demo model whose backbone each dense one starts from (`--init`), trained first
DEMO_INIT = {"detect": "classify", "segment": "detect"}


def with_prerequisites(tasks) -> list[str]:
    """`tasks` and the demo models they start from, in training order."""
    wanted = set()
    for task in tasks:
        while task is not None:
            wanted.add(task)
            task = DEMO_INIT.get(task)
    return [t for t in DEMO_RECIPES if t in wanted]


def demo_dir() -> Path:
    default = Path.home() / ".cache" / "convnext-serve" / "demo"
    return Path(os.environ.get("CONVNEXT_SERVE_DEMO_DIR", default))


def demo_checkpoint(task: str, folder: Path | None = None) -> Path:
    return (folder or demo_dir()) / f"{task}.safetensors"


def is_usable(path: Path) -> bool:
    try:
        read_checkpoint_meta(path)
        return True
    except CheckpointError:
        return False


def _synth_stamp(synth_args: dict) -> str:
    return json.dumps({"seed": SEED, **synth_args}, sort_keys=True)


def build_demo_models(
    folder: Path | None = None, tasks=("classify", "detect", "segment"), force: bool = False
) -> dict[str, Path]:
    """Synthesise the data and train each demo model that is missing, and those they start
    from; returns their paths."""
    folder = folder or demo_dir()
    paths = {}
    for task in with_prerequisites(tasks):
        out = demo_checkpoint(task, folder)
        paths[task] = out
        if out.is_file() and is_usable(out) and not force:
            continue
        try:
            minutes, metrics = _build(task, folder, out)
        except BaseException as e:  # a waiting service shows why; KeyboardInterrupt included
            write_progress(progress_path(out), state="failed", error=f"{type(e).__name__}: {e}")
            raise
        print(f"[demo] {task}: {metrics} in {minutes:.1f} min", file=sys.stderr)
    return paths


def _build(task: str, folder: Path, out: Path) -> tuple[float, dict]:
    """Synthesise `task`'s data (unless there) and train its model: (minutes, metrics)."""
    from .data import synth
    from .train import TrainConfig, train

    synth_args, train_args = DEMO_RECIPES[task]
    if os.environ.get("CONVNEXT_SERVE_DEMO_SMOKE") == "1":
        # a smoke run (the tests, a new image): little data, two steps an epoch; the models
        # answer, but know little
        synth_args = {**synth_args, "n": 64, "n_val": 16}
        train_args = {
            **train_args,
            "epochs": min(2, train_args["epochs"]),
            "max_steps_per_epoch": 2,
        }
    data = folder / "data" / task
    stamp = data / ".complete"  # holds the synth arguments: a changed recipe re-synthesises
    started = time.perf_counter()
    if not (stamp.is_file() and stamp.read_text() == _synth_stamp(synth_args)):
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        print(f"[demo] synthesising {task} data in {data}", file=sys.stderr)
        write_progress(progress_path(out), state="synthesising")
        synth(task, data, seed=SEED, **synth_args)
        stamp.write_text(_synth_stamp(synth_args))
    start = DEMO_INIT.get(task)
    extra = {"init": str(demo_checkpoint(start, folder))} if start else {}
    print(f"[demo] training the {task} demo model -> {out}", file=sys.stderr)
    cfg = TrainConfig.for_task(task, data=str(data), out=str(out), seed=SEED, **train_args, **extra)
    metrics = train(cfg)
    return (time.perf_counter() - started) / 60, metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m models.demo [--out DIR] [--force] [--tasks ...]`: `make demo-models`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m models.demo", description="Train the demo models that are missing."
    )
    parser.add_argument(
        "--out", type=Path, help="folder (default: $CONVNEXT_SERVE_DEMO_DIR or the cache)"
    )
    parser.add_argument("--force", action="store_true", help="retrain even if present")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(DEMO_RECIPES),
        default=list(DEMO_RECIPES),
        help="which models (with those they start from: DEMO_INIT)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority by N (the service's background training: a "
        "model joining the service, and the requests, come first)",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    started = time.perf_counter()
    paths = build_demo_models(args.out, tasks=tuple(args.tasks), force=args.force)
    for task, path in paths.items():
        print(f"{task}: {path}")
    print(f"[demo] done in {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
