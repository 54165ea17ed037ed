"""Scale-out: the same training loop under Ray Train's TorchTrainer (DDP).

gloo on CPU, NCCL on GPU; rank 0 evaluates and writes the state and the served checkpoint, so
with several nodes `--out` must be on storage every node can reach. `--address` points at an
existing Ray cluster (e.g. `ray://head:10001` or `auto`); without it a local Ray starts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .config import TrainConfig


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import ray.util
    import torch.distributed

    from .loop import Worker, fit

    ctx = ray.train.get_context()
    worker = Worker(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
    )
    cfg = TrainConfig.model_validate(config)
    metrics = fit(cfg, worker)
    nodes: list[str | None] = [None] * worker.world_size  # where each rank ran, for the log
    torch.distributed.all_gather_object(nodes, ray.util.get_node_ip_address())
    if worker.is_main:  # hand the results back to the driver through a small file next to out
        result = {"metrics": metrics, "nodes": nodes}
        Path(cfg.out).with_suffix(".metrics.json").write_text(json.dumps(result))


def fit_with_ray(cfg: TrainConfig) -> dict:
    """Run `cfg` on `cfg.num_workers` Ray Train workers; returns rank 0's final metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.gpus_per_worker > 0
    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True)
    out = Path(cfg.out).resolve()
    config = cfg.model_copy(update={"out": str(out), "data": str(Path(cfg.data).resolve())})
    resources = {"CPU": 1, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement,
        ),
        run_config=RunConfig(name=f"convnext-serve-{out.stem}", storage_path=str(out.parent)),
    )
    trainer.fit()
    metrics_file = out.with_suffix(".metrics.json")
    result = json.loads(metrics_file.read_text())
    metrics_file.unlink()
    by_node = Counter(result["nodes"])
    placed = ", ".join(f"{n} on {node}" for node, n in sorted(by_node.items()))
    print(f"Ray Train: {cfg.num_workers} workers: {placed}", flush=True)
    return result["metrics"]
