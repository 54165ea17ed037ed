"""CPU latency per image of the dense models through their inference API.

`maskrcnn_convnext_tiny` (80 classes) on 800x1333 images through `models.detection.detect`,
Mask R-CNN and Cascade Mask R-CNN ConvNeXt-T at 1280x800 (the paper's FPS setting), and
`upernet_convnext_tiny` (150 classes) on 512x512 images through `models.segmentation.segment`:
uint8 in, results at image size out (post-processing included), batch 1 and 4, fp32 and bf16
autocast (only on a CPU with bf16 kernels, as the service), channels_last weights as served.
Random weights: the compute is the trained model's. With a GPU (`--device cuda`), the detectors'
rows also give images/s beside the paper's A100 figures.

    .venv/bin/python bench/dense_bench.py [--rounds 3] [--only cascade] [--device cuda]
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

# The paper's Table 3: frames per second on one A100 at 1280x800 (mmdetection).
PAPER_A100_FPS = {"maskrcnn_convnext_tiny": "25.6", "cascade_maskrcnn_convnext_tiny": "13.5"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--only", help="run the rows whose model name contains this")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dense_bench: --device cuda, but torch sees no CUDA device")
    torch.manual_seed(0)
    dets = lambda m, imgs: detect(m, imgs, score_threshold=0.5)  # noqa: E731
    cases = [
        ("maskrcnn_convnext_tiny", "800x1333", (800, 1333), dets),
        ("maskrcnn_convnext_tiny", "1280x800", (800, 1280), dets),
        ("cascade_maskrcnn_convnext_tiny", "1280x800", (800, 1280), dets),
        (
            "upernet_convnext_tiny",
            "512x512",
            (512, 512),
            lambda m, imgs: segment(m, imgs, image_size=512),
        ),
    ]
    cases = [c for c in cases if args.only is None or args.only in c[0]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(cpu.fast_path_summary())
    gpu = args.device == "cuda"
    bf16_ok = gpu or cpu.has_native_bf16()
    precisions = [False, True] if bf16_ok else [False]
    if not bf16_ok:
        print(f"bf16 rows skipped: {cpu.bf16_unsupported_reason()}")
    print()
    print("| model | input | batch | precision | ms / image | images/s | paper, A100 |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, label, (h, w), run in cases:
        model = build_model(name, num_classes=150 if name.startswith("upernet") else 80)
        model = model.eval().to(args.device, memory_format=torch.channels_last)
        paper = PAPER_A100_FPS.get(name, "") if label == "1280x800" else ""
        for batch in args.batches:
            images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(batch)]
            for bf16 in precisions:
                autocast = (
                    torch.autocast(args.device, dtype=torch.bfloat16)
                    if bf16
                    else contextlib.nullcontext()
                )
                times = []
                with autocast:
                    run(model, images)  # warm-up
                    for _ in range(args.rounds):
                        start = time.perf_counter()
                        run(model, images)
                        if gpu:
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                seconds = statistics.median(times) / batch
                precision = "bf16 autocast" if bf16 else "fp32"
                print(
                    f"| {name} | {label} | {batch} | {precision} | {seconds * 1e3:.0f} | "
                    f"{1 / seconds:.1f} | {paper} |",
                    flush=True,
                )
        del model


if __name__ == "__main__":
    main()
