"""Architecture registry: every model name the project knows, reached through `build_model`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str  # classify | detect | segment
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, task: str) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Decorator: make `builder(num_classes=..., **kw)` reachable as `build_model(name)`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, task, builder)
        return builder

    return decorate


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, optionally only those of one task."""
    return [n for n, e in _REGISTRY.items() if task is None or e.task == task]


def model_task(arch: str) -> str:
    return _entry(arch).task


def _entry(arch: str) -> ModelEntry:
    try:
        return _REGISTRY[arch]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown architecture {arch!r}; known: {known}") from None


def build_model(arch: str, num_classes: int = 1000, **kw) -> nn.Module:
    """Build a fresh (randomly initialised) model by name."""
    return _entry(arch).builder(num_classes=num_classes, **kw)
