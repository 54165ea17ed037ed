"""`convnext-serve`: the command line (docs/training.md).

Each subcommand is a thin wrapper over a library call; heavy imports happen inside the handlers
so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys


def _convert(args: argparse.Namespace) -> int:
    from models import convert_checkpoint
    from models.convert import OFFICIAL_RELEASES
    from models.convert_dense import DENSE_RELEASES

    if args.list:
        for name, r in OFFICIAL_RELEASES.items():
            print(
                f"{name:28s} {r.arch:20s} {r.num_classes:6d} classes  {r.image_size}px  {r.dataset}"
            )
        for name, d in DENSE_RELEASES.items():
            print(f"{name:44s} {d.arch:32s} {d.dataset:7s} {d.image_size}px  paper: {d.paper}")
        return 0
    if not args.src or not args.out:
        raise SystemExit("convnext-serve convert: SRC and --out are required (or --list)")
    meta = convert_checkpoint(
        args.src,
        args.out,
        arch=args.arch,
        labels=args.labels,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
    )
    summary = meta.model_dump(include={"arch", "task", "num_classes", "image_size", "crop_pct"})
    print(f"wrote {args.out}: {json.dumps(summary)}")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from models.data import synth

    counts = synth(
        args.task,
        args.out,
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        plain=args.plain,
    )
    for split, c in counts.items():
        print(f"wrote {args.out}: {split}: {c['images']} images, {c['objects']} objects")
    return 0


def _train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train
    from models.train.loop import state_dir_for

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume:
        import torch

        state = torch.load(
            state_dir_for(TrainConfig.model_construct(resume=args.resume)) / "last.pt",
            map_location="cpu",
            weights_only=True,
        )
        stored = {k: v for k, v in state["config"].items() if v is not None}
        cfg = TrainConfig.model_validate({**stored, **given, "task": args.train_task})
    else:
        missing = [f"--{k}" for k in ("data", "arch", "out") if k not in given]
        if missing:
            raise SystemExit(f"convnext-serve train: {', '.join(missing)} required")
        if args.train_task == "classify":
            given = _with_recipe(given)
        cfg = TrainConfig.for_task(args.train_task, **given)
    metrics = train(cfg)
    print(f"wrote {cfg.out}: {json.dumps(metrics)}")
    return 0


def _with_recipe(given: dict) -> dict:
    """The classification recipe's values under what the user typed; says which and why."""
    from models.train.config import TrainConfig
    from models.train.recipes import choose_recipe

    epochs = given.get("epochs", TrainConfig.model_fields["epochs"].default)
    name, values, why = choose_recipe(given.get("recipe", "auto"), given["data"], epochs)
    shown = ", ".join(f"{k} {v}" for k, v in values.items() if k not in given)
    other = "paper" if name == "small" else "small"
    print(
        f"convnext-serve train: the {name} recipe ({why}){': ' + shown if shown else ''}; "
        f"--recipe {other} for the other",
        file=sys.stderr,
    )
    return {**values, **given, "recipe": name}


def _eval(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.eval_task,
        args.data,
        args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    if not args.json:
        for k, v in metrics.items():
            print(f"{k:>10s}  {v:.4f}")
    print(json.dumps(metrics))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import deploy_onto_cluster, serve_config, serve_until_stopped

    if args.pretrained and args.config:
        raise SystemExit("convnext-serve run: --pretrained or --config, not both")
    if args.address and args.num_cpus:
        raise SystemExit("convnext-serve run: --num-cpus is for a Ray of its own, not --address")
    config = serve_config(args.config, args.host, args.port, args.pretrained)
    if args.address:
        return deploy_onto_cluster(config, args.address)
    return serve_until_stopped(config, args.metrics_port, args.num_cpus)


def _demo_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.demo import build_demo_models

    paths = build_demo_models(Path(args.out) if args.out else None, force=args.force)
    for task, path in paths.items():
        print(f"{task}: {path}")
    return 0


def _add_config_flags(parser: argparse.ArgumentParser, model, exclude: set[str]) -> None:
    """One flag per field of a pydantic model: every knob of the recipe is on the command line.

    Defaults stay None here, so only what the user typed overrides the task's defaults.
    """
    import types
    import typing

    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        helptext = field.description or (
            "required" if field.is_required() else f"default: {field.default}"
        )
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=helptext)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), help=helptext)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=float, nargs=2, help=helptext)
        else:
            parser.add_argument(flag, type=kind, help=helptext)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convnext-serve", description="Serve and train ConvNeXt vision models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        help="serve models over HTTP (Ray Serve) until Ctrl-C",
        description="Starts a local Ray and the Serve application of a Ray Serve config file "
        "(with --address, deploys it onto a running Ray cluster instead); without --config, the "
        "bundled demo models (trained on first use).",
    )
    p.add_argument("--config", help="Ray Serve config (e.g. deploy/serve_config.yaml)")
    p.add_argument("--host", help="bind address (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port")
    p.add_argument("--num-cpus", type=int, help="logical CPUs Ray schedules (default: >= 4)")
    p.add_argument(
        "--address",
        help="a running Ray cluster (e.g. 10.0.0.5:6379; its token in RAY_AUTH_TOKEN): deploy "
        "onto it, as `serve deploy` does, and return once ready (without it: a Ray of its own)",
    )
    p.add_argument(
        "--pretrained",
        action="append",
        metavar="RELEASE",
        help="serve an official release (e.g. convnext_tiny_1k; repeatable), downloaded and "
        "converted on first use ($CONVNEXT_SERVE_WEIGHTS_URL: a mirror; `convert --list`)",
    )
    p.set_defaults(handler=_run)

    p = sub.add_parser("demo-models", help="train the demo models if missing")
    p.add_argument("--out", help="folder (default: $CONVNEXT_SERVE_DEMO_DIR or the cache)")
    p.add_argument("--force", action="store_true", help="retrain even if present")
    p.set_defaults(handler=_demo_models)

    p = sub.add_parser(
        "convert",
        help="turn upstream ConvNeXt weights into a served checkpoint",
        description="SRC is a file (.pth/.safetensors: official, timm or torchvision layout; "
        "mmdetection/mmsegmentation for a detect/segment --arch), a URL, or an official release "
        "name such as convnext_tiny_1k or cascade_maskrcnn_convnext_tiny_1k_3x_coco (--list).",
    )
    p.add_argument("src", nargs="?", help="file, URL or official release name")
    p.add_argument("--arch", help="architecture, e.g. convnext_tiny (implied by a release name)")
    p.add_argument("--out", help="output .safetensors file")
    p.add_argument("--labels", help="class names: a text file (one per line) or a JSON list")
    p.add_argument("--image-size", type=int, help="inference resolution (default: the source's)")
    p.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the source's)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])
    p.add_argument("--list", action="store_true", help="list the official release names")
    p.set_defaults(handler=_convert)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "synth",
        help="write a synthetic shapes dataset",
        description="Writes a seeded synthetic dataset of shapes (circle, square, triangle, "
        "star) in the task's layout: ImageFolder, COCO or ADE20K style.",
    )
    p.add_argument("task", choices=["classify", "detect", "segment"])
    p.add_argument("--out", required=True, help="output directory (absent or empty)")
    p.add_argument("--n", type=int, default=1000, help="training images (val: max(n/5, 20))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, help="pixels (default: 64 classify, 128 others)")
    p.add_argument("--plain", action="store_true", help="flat backgrounds (an easy variant)")
    p.set_defaults(handler=_data_synth)

    from models.train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model and write a served checkpoint",
        description="The paper's recipe by default (classify); detect and segment use Mask "
        "R-CNN / UperNet defaults. --resume DIR continues an interrupted run.",
    )
    p.add_argument("train_task", choices=["classify", "detect", "segment"])
    _add_config_flags(p, TrainConfig, exclude={"task"})
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="evaluate a served checkpoint on a dataset's val split")
    p.add_argument("eval_task", choices=["classify", "detect", "segment"])
    p.add_argument("--data", required=True, help="dataset root (ImageFolder, COCO or ADE20K)")
    p.add_argument("--checkpoint", required=True, help="served .safetensors checkpoint")
    p.add_argument("--json", action="store_true", help="last line: one JSON object of metrics")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(handler=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError: one clear line
        print(f"convnext-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
