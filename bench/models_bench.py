"""CPU images/s of this project's ConvNeXt-T against torchvision's, in one run.

Both models hold the same weights (torchvision's, converted) and run under
`torch.inference_mode()`. Cells: batch 1 and 16, NCHW and channels_last, fp32 and bf16 autocast
(bf16 only on a CPU with native bf16: elsewhere both models would run reference kernels about
ten times slower, and the service refuses bf16 there). The models are timed alternately, round
after round, so drift in the machine's speed affects both alike; each cell reports the median
over rounds. The header says which path this CPU takes for the block MLP.

`--paths` adds a second table: this project's model with the fused oneDNN MLP, with the plain
modules, and (with `--compile`) the plain model under `torch.compile`, channels_last fp32.

    .venv/bin/python bench/models_bench.py [--rounds 7] [--arch convnext_tiny] [--paths]
        [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from models import build_model, cpu
from models.convert import to_official_layout


def time_once(model: Callable, x: torch.Tensor, bf16: bool) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        model(x)
    return time.perf_counter() - start


def images_per_s(models: dict[str, Callable], x: torch.Tensor, bf16: bool, rounds: int) -> dict:
    """{name: images/s}: the models timed alternately, median over rounds, after a warm-up."""
    for model in models.values():  # warm-up: allocator, oneDNN primitive caches
        for _ in range(2):
            time_once(model, x, bf16)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(time_once(model, x, bf16))
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


class PlainMlp:
    """The model with the fused kernel switched off while it runs."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cpu.set_fused_linear(False)
        try:
            return self.model(x)
        finally:
            cpu.set_fused_linear(True)


def path_table(model: torch.nn.Module, args: argparse.Namespace) -> None:
    model = model.to(memory_format=torch.channels_last)
    candidates: dict[str, Callable] = {"fused oneDNN": model, "plain": PlainMlp(model)}
    if args.compile:
        candidates["torch.compile"] = torch.compile(model)  # traces the plain modules
    print()
    print("| batch | " + " | ".join(f"{n} (img/s)" for n in candidates) + " | fused / plain |")
    print("|---:|" + "---:|" * (len(candidates) + 1))
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        x = x.contiguous(memory_format=torch.channels_last)
        if args.compile:
            start = time.perf_counter()
            time_once(candidates["torch.compile"], x, False)
            print(f"(torch.compile, batch {batch}: {time.perf_counter() - start:.0f} s to compile)")
        ips = images_per_s(candidates, x, False, args.rounds)
        cells = " | ".join(f"{v:.1f}" for v in ips.values())
        ratio = ips["fused oneDNN"] / ips["plain"]
        print(f"| {batch} | {cells} | {ratio:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="convnext_tiny")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--paths", action="store_true", help="fused vs plain MLP table")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to --paths")
    args = parser.parse_args()

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, args.arch)().eval()
    ours = build_model(args.arch).eval()
    ours.load_state_dict(to_official_layout(theirs.state_dict()))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch} @{args.size}")
    print(cpu.fast_path_summary())
    precisions = [False, True] if cpu.has_native_bf16() else [False]
    if not cpu.has_native_bf16():
        print(f"bf16 cells skipped: {cpu.bf16_unsupported_reason()}")
    print()
    print("| batch | layout | precision | this project (img/s) | torchvision (img/s) | ratio |")
    print("|---:|---|---|---:|---:|---:|")
    for batch, channels_last, bf16 in itertools.product(args.batches, (False, True), precisions):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=fmt)
        models = {"ours": ours.to(memory_format=fmt), "tv": theirs.to(memory_format=fmt)}
        ips = images_per_s(models, x, bf16, args.rounds)
        print(
            f"| {batch} | {'channels_last' if channels_last else 'NCHW'} "
            f"| {'bf16 autocast' if bf16 else 'fp32'} | {ips['ours']:.1f} | {ips['tv']:.1f} "
            f"| {ips['ours'] / ips['tv']:.2f} |",
            flush=True,
        )
    if args.paths:
        path_table(ours, args)


if __name__ == "__main__":
    main()
