"""`convnext-serve`: the command line (DESIGN section 4).

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

    if args.list:
        for name, r in OFFICIAL_RELEASES.items():
            print(
                f"{name:28s} {r.arch:20s} {r.num_classes:6d} classes  {r.image_size}px  {r.dataset}"
            )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convnext-serve", description="Serve and train ConvNeXt vision models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert",
        help="turn upstream ConvNeXt weights into a served checkpoint",
        description="SRC is a file (.pth/.safetensors: official, timm or torchvision layout), "
        "a URL, or an official release name such as convnext_tiny_1k (see --list).",
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
