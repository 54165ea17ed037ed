"""Model versions in a replica, in-process (no Ray): the config's two forms, the draw by weight
and its stickiness per client, a named version answering, and what the replica lists."""

from __future__ import annotations

import asyncio
import io
from collections import Counter

import pytest
from PIL import Image
from pydantic import ValidationError

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance
from service.config import ModelConfig, ServerConfig
from service.data_plane import DataPlane
from service.errors import ModelNotFound
from service.served_models import ServedModels

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
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("versions")
    return {
        "v1": str(tiny(folder / "v1.safetensors", "classify", ["a", "b", "c"])),
        "v2": str(tiny(folder / "v2.safetensors", "classify", ["x", "y", "z"])),
        "segment": str(tiny(folder / "seg.safetensors", "segment", ["ground", "thing"])),
    }


def served(checkpoints, weights=(95, 5), second: str = "v2") -> ServedModels:
    versions = [
        {"version": 1, "checkpoint": checkpoints["v1"], "weight": weights[0]},
        {"version": 2, "checkpoint": checkpoints[second], "weight": weights[1]},
    ]
    model = ModelConfig(name="m", versions=versions, max_batch_size=2, warmup_batches=0)
    return ServedModels([model], [], ServerConfig())


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_the_short_form_is_version_1_and_a_model_gives_one_form():
    short = ModelConfig(name="m", checkpoint="a.safetensors")
    [only] = short.served_versions()
    assert (only.version, only.checkpoint, only.weight) == (1, "a.safetensors", 1.0)
    two = [{"version": 1, "checkpoint": "a"}, {"version": 2, "checkpoint": "b", "weight": 0}]
    assert [v.version for v in ModelConfig(name="m", versions=two).served_versions()] == [1, 2]
    for wrong, problem in [
        ({}, "give `checkpoint` or `versions`"),
        ({"checkpoint": "a", "versions": two}, "give `checkpoint` or `versions`"),
        ({"versions": [two[0], {**two[1], "version": 1}]}, "versions must be unique"),
        ({"versions": [{**two[0], "weight": 0}, two[1]]}, "a weight over 0"),
        ({"versions": [{"version": 0, "checkpoint": "a"}]}, "greater than or equal to 1"),
    ]:
        with pytest.raises(ValidationError, match=problem):
            ModelConfig(name="m", **wrong)


def test_requests_that_name_no_version_split_by_weight(checkpoints):
    model = served(checkpoints).models["m"]
    drawn = Counter(model.choose().version for _ in range(4000))
    assert set(drawn) == {"1", "2"}
    assert 0.03 < drawn["2"] / 4000 < 0.07, drawn  # 5%: binomial sd 0.34 points


def test_a_client_keeps_its_version_and_a_growing_canary_only_takes_clients(checkpoints):
    clients = [f"client-{i}" for i in range(2000)]

    def on_canary(weights) -> set[str]:
        model = served(checkpoints, weights).models["m"]
        first = {c for c in clients if model.choose(c).version == "2"}
        assert first == {c for c in clients if model.choose(c).version == "2"}  # sticky
        return first

    at_5, at_50, at_100 = on_canary((95, 5)), on_canary((50, 50)), on_canary((0, 100))
    assert 0.03 < len(at_5) / 2000 < 0.07 and 0.45 < len(at_50) / 2000 < 0.55
    assert at_5 <= at_50 <= at_100 == set(clients)  # nobody moved back to version 1


def test_a_named_version_answers_and_an_unknown_one_is_not_found(checkpoints):
    models = served(checkpoints, (100, 0))
    plane = DataPlane(ServerConfig(), models, set())
    for version, labels in (("1", "abc"), ("2", "xyz")):
        host = plane.model("classify", "m", version)
        assert host.version == version
        [output] = asyncio.run(plane.infer(host, [png()], host.task.options_from({})))
        predictions = host.task.result(host.meta, output)["predictions"]
        assert {p["label"] for p in predictions} == set(labels)
    assert {plane.model("classify", None).version for _ in range(50)} == {"1"}  # weight 0
    with pytest.raises(ModelNotFound, match=r"model 'm' has no version '3'; it has \['1', '2'\]"):
        plane.model("classify", "m", "3")
    with pytest.raises(ModelNotFound, match="no model 'n'"):
        plane.model(None, "n", "1")


def test_the_replica_lists_each_version_with_its_weight(checkpoints):
    plane = DataPlane(ServerConfig(), served(checkpoints), set())
    listed = [(m["name"], m["version"], m["weight"]) for m in plane.listing()["models"]]
    assert listed == [("m", "1", 95.0), ("m", "2", 5.0)]
    assert [m["metadata"]["labels"] for m in plane.listing()["models"]] == [
        ["a", "b", "c"],
        ["x", "y", "z"],
    ]


def test_versions_of_one_model_share_its_task(checkpoints):
    with pytest.raises(ValueError, match="its versions must share a task"):
        served(checkpoints, second="segment")
