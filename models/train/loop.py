"""The training loop shared by the three tasks.

AdamW with per-step warmup + cosine (classification, detection) or warmup + poly
(segmentation), optional layer-wise lr decay, mixed precision, channels_last, gradient
accumulation, an EMA of the weights evaluated alongside, a progress bar, one JSON line of metrics
per epoch, a PNG of the curves, and a resumable state every epoch. Every epoch reseeds all random
generators from (seed, epoch, rank), so a resumed run computes exactly what an uninterrupted one
would have. Under Ray Train (`distributed.py`) the same function runs in every worker with DDP;
rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..cpu import has_native_bf16
from .config import TrainConfig
from .optim import param_groups, warmup_cosine, warmup_poly
from .progress import ProgressFile, progress_path, write_progress
from .tasks import TRAINING_TASKS


@dataclass(frozen=True)
class Worker:
    """Where this process sits: its rank among `world_size` and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the device does it natively (CUDA with bf16, CPUs with oneDNN bf16 kernels)."""
    if cfg.amp == "none":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if has_native_bf16() else None


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (mt, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    mt, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((mt, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def state_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.resume or cfg.state_dir or f"{cfg.out}.state")


# an epoch's log row beside its losses and metrics
BOOKKEEPING = ("epoch", "lr", "images_per_s", "seconds", "images", "world_size")


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and metric curves per epoch, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[-1] if k not in BOOKKEEPING]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, key in zip(axes.flat, keys, strict=False):
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def fit(cfg: TrainConfig, worker: Worker | None = None) -> dict:
    """Train `cfg`, write the served checkpoint to `cfg.out`; returns the final metrics."""
    worker = worker or Worker(device=default_device())
    device = worker.device
    seed_epoch(cfg.seed, 0, 0)  # the model's init is the same on every rank
    task = TRAINING_TASKS[cfg.task](cfg)
    model = task.build_model().to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0
        else None
    )
    train_model: nn.Module = model
    if worker.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = torch.utils.data.DistributedSampler(
        task.train_set,
        num_replicas=worker.world_size,
        rank=worker.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    loader = torch.utils.data.DataLoader(
        task.train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=task.loader_workers,
        collate_fn=task.collate,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=_quiet_worker,
    )
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data}: {len(task.train_set)} training images are fewer than one batch of "
            f"{cfg.batch_size} x {worker.world_size} workers"
        )
    updates_per_epoch = max(1, steps_per_epoch // cfg.accum_steps)
    total = cfg.epochs * updates_per_epoch
    warmup = min(int(cfg.warmup_epochs * updates_per_epoch), total - 1)
    lr = cfg.peak_lr(worker.world_size)
    optimizer = torch.optim.AdamW(
        param_groups(model, lr, cfg.weight_decay, cfg.layer_decay),
        lr=lr,
        betas=(0.9, 0.999),
        fused=device.type in ("cpu", "cuda"),  # one kernel for all tensors
    )
    min_factor = cfg.min_lr / lr if lr > 0 else 0.0
    if cfg.task == "segment":
        schedule = lambda step: warmup_poly(step, total, warmup, 1.0, min_factor)  # noqa: E731
    else:
        schedule = lambda step: warmup_cosine(step, total, warmup, min_factor)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    state_path = state_dir_for(cfg) / "last.pt"
    history: list[dict] = []
    start_epoch = 0
    if cfg.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], list(state["history"])
        if worker.is_main:
            print(f"resumed {state_path} at epoch {start_epoch}", file=sys.stderr)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.stem + ".log.jsonl")
    if worker.is_main and not cfg.resume:
        log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
    progress = (
        ProgressFile(progress_path(out), cfg.epochs, steps_per_epoch, start_epoch)
        if worker.is_main
        else None
    )
    try:
        for epoch in range(start_epoch, cfg.epochs):
            seed_epoch(cfg.seed, epoch + 1, worker.rank)
            sampler.set_epoch(epoch)
            row = _train_epoch(
                cfg,
                task,
                train_model,
                model,
                ema,
                loader,
                steps_per_epoch,
                optimizer,
                scheduler,
                scaler,
                dtype,
                worker,
                epoch,
                progress,
            )
            if worker.is_main:
                row.update(_evaluate(task, model, ema, device))
                history.append(row)
                print(json.dumps(row), flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                plot_curves(history, out.with_name(out.stem + ".curves.png"))
                _atomic_save(
                    {
                        "config": cfg.model_dump(mode="json"),
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": _rng_state(),
                        "history": history,
                    },
                    state_path,
                )
            if worker.world_size > 1:
                torch.distributed.barrier()
    except KeyboardInterrupt:
        if worker.is_main:
            print(
                f"\ninterrupted: the state after the last full epoch is in {state_path.parent}; "
                f"continue with --resume {state_path.parent}",
                file=sys.stderr,
            )
        raise
    if not worker.is_main:
        return {}
    final = history[-1] if history else {}
    best = _choose_weights(task, final)
    weights = ema.module if best == "ema" else model
    metrics = {
        k.removeprefix("ema_"): v
        for k, v in final.items()
        if k.startswith("ema_") == (best == "ema")
        and not k.startswith("loss")
        and k not in BOOKKEEPING
    }
    meta = task.meta(
        metrics,
        {
            "dataset": str(cfg.data),
            "recipe": cfg.model_dump(mode="json", exclude={"progress"}),
            "weights": best,
            "epochs": cfg.epochs,
            "created": _dt.datetime.now(_dt.UTC).isoformat(),
        },
    )
    save_checkpoint(weights, out, meta)
    write_progress(progress_path(out), state="done", metrics=metrics)
    return metrics


def _quiet_worker(_: int) -> None:
    torch.set_num_threads(1)  # loader workers decode and augment; the cores are for the model


def _choose_weights(task, final: dict) -> str:
    """Serve the EMA weights when they evaluate at least as well as the raw ones."""
    key = task.primary
    if f"ema_{key}" in final and final[f"ema_{key}"] >= final.get(key, -1.0):
        return "ema"
    return "model"


def _evaluate(task, model: nn.Module, ema, device) -> dict:
    model.eval()
    metrics = task.evaluate(model, device)
    if ema is not None:
        ema.module.eval()
        metrics.update({f"ema_{k}": v for k, v in task.evaluate(ema.module, device).items()})
    model.train()
    return metrics


def _train_epoch(
    cfg,
    task,
    train_model,
    model,
    ema,
    loader,
    steps,
    optimizer,
    scheduler,
    scaler,
    dtype,
    worker,
    epoch,
    progress: ProgressFile | None = None,
) -> dict:
    device = worker.device
    train_model.train()
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    sums: dict[str, float] = {}
    own_images, started = 0, time.perf_counter()  # what this rank trained on
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not (cfg.progress and worker.is_main),
        file=sys.stderr,
    )
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        with autocast:
            loss, parts, n = task.loss(train_model, batch, device)
        loss = loss.float()
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}")
        scaler.scale(loss / cfg.accum_steps).backward()
        if (step + 1) % cfg.accum_steps == 0:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        own_images += n
        elapsed = time.perf_counter() - started
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            img_s=f"{own_images * worker.world_size / elapsed:.1f}",
        )
        bar.update()
        if progress is not None:
            progress.step(epoch, step)
    bar.close()
    elapsed = time.perf_counter() - started
    row = {"epoch": epoch + 1, "lr": max(g["lr"] for g in optimizer.param_groups)}
    row.update({k: v / steps for k, v in sums.items()})
    # what every rank trained on, counted by each: with a worker missing, fewer images
    images = torch.tensor([float(own_images)], device=device)
    if worker.world_size > 1:
        torch.distributed.all_reduce(images)
    row.update(images=int(images.item()), world_size=worker.world_size)
    row.update(images_per_s=own_images * worker.world_size / elapsed, seconds=elapsed)
    return row
