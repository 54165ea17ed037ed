"""Tiny checkpoints the in-process tests load in a second: two classifiers that answer in
different words (two versions of one model, told apart by their labels) and a segmenter."""

from __future__ import annotations

import pytest

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance

HEADS = {"classify": ("convnext_atto", "linear"), "segment": ("upernet_convnext_atto", "upernet")}


def tiny(path, task: str, labels: list[str]):
    arch, head = HEADS[task]
    meta = CheckpointMeta(
        task=task,
        arch=arch,
        head=head,
        num_classes=len(labels),
        labels=labels,
        image_size=32,
        provenance=Provenance(source="trained"),
    )
    return save_checkpoint(build_model(arch, num_classes=len(labels)), path, meta)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("versions")
    return {
        "v1": str(tiny(folder / "v1.safetensors", "classify", ["a", "b", "c"])),
        "v2": str(tiny(folder / "v2.safetensors", "classify", ["x", "y", "z"])),
        "segment": str(tiny(folder / "seg.safetensors", "segment", ["ground", "thing"])),
    }
