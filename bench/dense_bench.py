"""CPU latency per image of the dense models through their inference API.

`maskrcnn_convnext_tiny` (80 classes) on 800x1333 images through `models.detection.detect`, and
`upernet_convnext_tiny` (150 classes) on 512x512 images through `models.segmentation.segment`:
uint8 in, results at image size out (post-processing included), batch 1 and 4, fp32 and bf16
autocast (only on a CPU with bf16 kernels, as the service), channels_last weights as served.
Random weights: the compute is the trained model's.

    .venv/bin/python bench/dense_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from models import build_model, cpu
from models.detection import detect
from models.segmentation import segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [
        (
            "maskrcnn_convnext_tiny",
            "800x1333",
            build_model("maskrcnn_convnext_tiny", num_classes=80),
            (800, 1333),
            lambda m, imgs: detect(m, imgs, score_threshold=0.5),
        ),
        (
            "upernet_convnext_tiny",
            "512x512",
            build_model("upernet_convnext_tiny", num_classes=150),
            (512, 512),
            lambda m, imgs: segment(m, imgs, image_size=512),
        ),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(cpu.fast_path_summary())
    precisions = [False, True] if cpu.has_native_bf16() else [False]
    if not cpu.has_native_bf16():
        print(f"bf16 rows skipped: {cpu.bf16_unsupported_reason()}")
    print()
    print("| model | input | batch | precision | ms / image |")
    print("|---|---|---:|---|---:|")
    for name, label, model, (h, w), run in cases:
        model = model.eval().to(memory_format=torch.channels_last)
        for batch in args.batches:
            images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(batch)]
            for bf16 in precisions:
                autocast = (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if bf16
                    else contextlib.nullcontext()
                )
                times = []
                with autocast:
                    run(model, images)  # warm-up
                    for _ in range(args.rounds):
                        start = time.perf_counter()
                        run(model, images)
                        times.append(time.perf_counter() - start)
                ms = statistics.median(times) / batch * 1e3
                precision = "bf16 autocast" if bf16 else "fp32"
                print(f"| {name} | {label} | {batch} | {precision} | {ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
