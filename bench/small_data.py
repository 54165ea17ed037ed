"""The classification recipes on a small real dataset: scikit-learn's 1,797 handwritten digits
(8 x 8 px; 1,437 train / 360 val), ConvNeXt-atto from scratch, the same epochs each.

    .venv/bin/python bench/small_data.py [--epochs 40] [--curves docs/small-data-curves.png]

Rows: the paper's ImageNet recipe (`--recipe paper`, at 32 px), what `convnext-serve train` picks by
itself (`auto`: the small-data recipe), the same with `--hflip 0` (digits are not mirror
images), and an RBF SVM on the raw pixels as the reference a good from-scratch method reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.cli import main as cli  # noqa: E402
from tests.digits import write_digits  # noqa: E402


def svm_reference() -> float:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    x, y = digits.images.reshape(len(digits.images), -1) / 16, digits.target
    val = np.arange(len(y)) % 5 == 0  # the split write_digits makes
    return float(SVC(gamma=0.05, C=10).fit(x[~val], y[~val]).score(x[val], y[val]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--curves", type=Path, help="write the top-1 curves to this PNG")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="small-data-"))
    data = write_digits(folder / "digits")
    runs = {
        # at the small recipe's 32 px: at its own 224 px a run takes 30x longer
        "paper (--recipe paper --image-size 32)": ["--recipe", "paper", "--image-size", "32"],
        "auto: small": [],
        "auto: small, --hflip 0": ["--hflip", "0"],
    }
    rows, curves = [], {}
    for name, flags in runs.items():
        out = folder / f"{len(curves)}.safetensors"
        started = time.perf_counter()
        cmd = [
            "train",
            "classify",
            "--data",
            str(data),
            "--arch",
            "convnext_atto",
            "--out",
            str(out),
            "--epochs",
            str(args.epochs),
            "--no-progress",
            *flags,
        ]
        assert cli(cmd) == 0
        minutes = (time.perf_counter() - started) / 60
        log = [json.loads(line) for line in out.with_name(out.stem + ".log.jsonl").open()]
        curves[name] = [row["top1"] for row in log]
        best = max(row["top1"] for row in log)
        rows.append((name, f"{log[-1]['top1']:.3f}", f"{best:.3f}", f"{minutes:.1f}"))
    rows.append(("RBF SVM on the pixels (reference)", f"{svm_reference():.3f}", "", ""))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"\ndigits, convnext_atto from scratch, {args.epochs} epochs ({os.cpu_count()} x {cpu})\n"
    )
    print("| recipe | top-1 (last) | top-1 (best epoch) | minutes |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, values in curves.items():
            ax.plot(range(1, len(values) + 1), values, label=name)
        ax.set(
            xlabel="epoch",
            ylabel="val top-1",
            ylim=(0, 1),
            title="ConvNeXt-atto on 1,437 digits (8 px), from scratch",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.curves, dpi=80)
        print(f"\ncurves: {args.curves}")


if __name__ == "__main__":
    main()
