"""CPU images/s of this project's ConvNeXt-T against torchvision's, in one run.

Both models hold the same weights (torchvision's, converted) and run under
`torch.inference_mode()`. Cells: batch 1 and 16, NCHW and channels_last, fp32 and bf16 autocast.
The two models are timed alternately, round after round, so drift in the machine's speed
affects both alike; each cell reports the median over rounds.

    .venv/bin/python bench/models_bench.py [--rounds 7] [--arch convnext_tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

import torch
import torchvision

from models import build_model
from models.convert import to_official_layout


def time_once(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="convnext_tiny")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, args.arch)().eval()
    ours = build_model(args.arch).eval()
    ours.load_state_dict(to_official_layout(theirs.state_dict()))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch} @{args.size}")
    print()
    print("| batch | layout | precision | this project (img/s) | torchvision (img/s) | ratio |")
    print("|---:|---|---|---:|---:|---:|")
    for batch, channels_last, bf16 in itertools.product(args.batches, (False, True), (False, True)):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=fmt)
        models = {"ours": ours.to(memory_format=fmt), "tv": theirs.to(memory_format=fmt)}
        times: dict[str, list[float]] = {"ours": [], "tv": []}
        for model in models.values():  # warm-up: allocator, oneDNN primitive caches
            for _ in range(2):
                time_once(model, x, bf16)
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(time_once(model, x, bf16))
        ips = {name: batch / statistics.median(t) for name, t in times.items()}
        print(
            f"| {batch} | {'channels_last' if channels_last else 'NCHW'} "
            f"| {'bf16 autocast' if bf16 else 'fp32'} | {ips['ours']:.1f} | {ips['tv']:.1f} "
            f"| {ips['ours'] / ips['tv']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
