"""Model versions in a replica, in-process (no Ray): the config's two forms, the draw by weight
and its stickiness per client, a named version answering, and what the replica lists."""

from __future__ import annotations

import asyncio
import io
from collections import Counter

import pytest
from PIL import Image
from pydantic import ValidationError

from service.config import ModelConfig, ServerConfig
from service.data_plane import DataPlane
from service.errors import ModelNotFound
from service.served_models import ServedModels


def served(tiny_checkpoints, weights=(95, 5), second: str = "v2") -> ServedModels:
    versions = [
        {"version": 1, "checkpoint": tiny_checkpoints["v1"], "weight": weights[0]},
        {"version": 2, "checkpoint": tiny_checkpoints[second], "weight": weights[1]},
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


def test_requests_that_name_no_version_split_by_weight(tiny_checkpoints):
    model = served(tiny_checkpoints).models["m"]
    drawn = Counter(model.choose().version for _ in range(4000))
    assert set(drawn) == {"1", "2"}
    assert 0.03 < drawn["2"] / 4000 < 0.07, drawn  # 5%: binomial sd 0.34 points


def test_a_client_keeps_its_version_and_a_growing_canary_only_takes_clients(tiny_checkpoints):
    clients = [f"client-{i}" for i in range(2000)]

    def on_canary(weights) -> set[str]:
        model = served(tiny_checkpoints, weights).models["m"]
        first = {c for c in clients if model.choose(c).version == "2"}
        assert first == {c for c in clients if model.choose(c).version == "2"}  # sticky
        return first

    at_5, at_50, at_100 = on_canary((95, 5)), on_canary((50, 50)), on_canary((0, 100))
    assert 0.03 < len(at_5) / 2000 < 0.07 and 0.45 < len(at_50) / 2000 < 0.55
    assert at_5 <= at_50 <= at_100 == set(clients)  # nobody moved back to version 1


def test_a_named_version_answers_and_an_unknown_one_is_not_found(tiny_checkpoints):
    models = served(tiny_checkpoints, (100, 0))
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


def test_the_replica_lists_each_version_with_its_weight(tiny_checkpoints):
    plane = DataPlane(ServerConfig(), served(tiny_checkpoints), set())
    listed = [(m["name"], m["version"], m["weight"]) for m in plane.listing()["models"]]
    assert listed == [("m", "1", 95.0), ("m", "2", 5.0)]
    assert [m["metadata"]["labels"] for m in plane.listing()["models"]] == [
        ["a", "b", "c"],
        ["x", "y", "z"],
    ]


def test_versions_of_one_model_share_its_task(tiny_checkpoints):
    with pytest.raises(ValueError, match="its versions must share a task"):
        served(tiny_checkpoints, second="segment")


# ------------------------------------------------------------------------ updates in place


def model(tiny_checkpoints, *versions: tuple[int, str, float], **settings) -> ModelConfig:
    listed = [
        {"version": v, "checkpoint": tiny_checkpoints[c], "weight": w} for v, c, w in versions
    ]
    return ModelConfig(name="m", versions=listed, max_batch_size=2, warmup_batches=1, **settings)


def labels_of(host) -> set[str]:
    plane = DataPlane(ServerConfig(), None, set())
    [output] = asyncio.run(plane.infer(host, [png()], host.task.options_from({})))
    return {p["label"] for p in host.task.result(host.meta, output)["predictions"]}


def test_an_update_swaps_in_only_what_changed_each_version_warm(tiny_checkpoints):
    models = ServedModels([model(tiny_checkpoints, (1, "v1", 1))], [], ServerConfig())
    first = models.models["m"].hosts["1"]
    first.warm.result()
    # a second version, as a canary: the first keeps its host, the new one is warm when served
    models.update([model(tiny_checkpoints, (1, "v1", 95), (2, "v2", 5))], [])
    served = models.models["m"]
    assert served.hosts["1"] is first and served.hosts["2"].ready
    assert served.weights == {"1": 95, "2": 5} and not models.update_errors
    # weights alone: the same hosts
    models.update([model(tiny_checkpoints, (1, "v1", 0), (2, "v2", 100))], [])
    assert models.models["m"].hosts["1"] is first and models.models["m"].choose().version == "2"
    # version 1's checkpoint replaced: a new host; a request that already holds the old one
    # is still answered by it
    models.update([model(tiny_checkpoints, (1, "v2", 1))], [])
    assert models.models["m"].hosts["1"] is not first and "2" not in models.models["m"].hosts
    assert labels_of(first) == set("abc") and labels_of(models.models["m"].hosts["1"]) == set("xyz")


def test_an_update_that_cannot_load_leaves_the_model_serving_as_it_was(tiny_checkpoints, tmp_path):
    models = ServedModels([model(tiny_checkpoints, (1, "v1", 1))], [], ServerConfig())
    before = models.models["m"]
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    broken = {**tiny_checkpoints, "broken": str(tmp_path / "broken.safetensors")}
    models.update([model(broken, (1, "v1", 50), (2, "broken", 50))], [])
    assert models.models["m"] is before
    assert "not updated, still serving as before" in models.update_errors["m"]
    assert "broken.safetensors" in models.update_errors["m"]
    # versions of another task: refused the same way
    models.update([model(tiny_checkpoints, (1, "v1", 1), (2, "segment", 1))], [])
    assert models.models["m"] is before and "share a task" in models.update_errors["m"]
    # the next good update clears the error
    models.update([model(tiny_checkpoints, (1, "v1", 1), (2, "v2", 1))], [])
    assert sorted(models.models["m"].hosts) == ["1", "2"] and not models.update_errors


def test_a_model_left_out_of_an_update_is_no_longer_served(tiny_checkpoints):
    other = ModelConfig(name="n", checkpoint=tiny_checkpoints["v2"], warmup_batches=0)
    models = ServedModels([model(tiny_checkpoints, (1, "v1", 1)), other], [], ServerConfig())
    assert models.default["classify"].name == "m"
    models.update([other], [])
    assert sorted(models.models) == ["n"] and models.default["classify"].name == "n"
    with pytest.raises(ModelNotFound, match="no model 'm'; served: \\['n'\\]"):
        models.named("m")


def test_a_model_is_full_when_every_version_taking_traffic_is(tiny_checkpoints):
    """What the guard refuses before a request's body: every version with a weight has its
    line full (a version of weight 0 does not count: unnamed requests never reach it)."""
    model = ModelConfig(
        name="m",
        versions=[
            {"version": 1, "checkpoint": tiny_checkpoints["v1"], "weight": 1},
            {"version": 2, "checkpoint": tiny_checkpoints["v2"], "weight": 0},
        ],
        max_ongoing_requests=1,
        max_queued_requests=0,
        warmup_batches=0,
    )
    served = ServedModels([model], [], ServerConfig(retry_after_s=4)).models["m"]
    assert not served.full()
    served.hosts["1"].queue.in_flight = 1  # its one slot taken, no waiting room
    assert served.full() and not served.hosts["2"].full()
    refusal = served.overloaded()
    assert refusal.status == 503 and refusal.headers == {"Retry-After": "4"}
    assert refusal.message == "model 'm' has a full queue; retry shortly"
