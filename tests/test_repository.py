"""The model repository's pieces in-process (no Ray): which tiny_checkpoints a repository call may
name, the config's models with the changes over them, the shared state's bookkeeping, and a
replica's sync applying changes to its real served models."""

from __future__ import annotations

import os
import time

import pytest

from service.config import ModelConfig, ServerConfig
from service.errors import Forbidden
from service.repository import (
    RepositoryState,
    RepositorySync,
    check_checkpoint,
    fingerprint,
    overlay,
)
from service.served_models import ServedModels


def test_only_files_under_the_model_roots_may_be_loaded(tmp_path):
    root, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    (root / "team").mkdir(parents=True)
    elsewhere.mkdir()
    inside, outside = root / "team" / "a.safetensors", elsewhere / "b.safetensors"
    inside.write_bytes(b"x")
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.safetensors")  # a symlink out of the root
    roots = [str(root)]
    assert check_checkpoint(str(inside), roots) == inside.resolve()
    refused = {
        str(outside): "outside the model roots",
        str(root / "link.safetensors"): "outside the model roots",
        str(root / ".." / "elsewhere" / "b.safetensors"): "outside the model roots",
        "https://example.com/a.safetensors": "not URLs or specs",
        "demo:classify": "not URLs or specs",
    }
    for spec, problem in refused.items():
        with pytest.raises(Forbidden, match=problem):
            check_checkpoint(spec, roots)
    with pytest.raises(Forbidden, match="no model roots are set"):
        check_checkpoint(str(inside), [])


def test_changes_replace_leave_out_and_add_models_in_the_configs_order():
    a, b = ModelConfig(name="a", checkpoint="a1"), ModelConfig(name="b", checkpoint="b1")
    c = ModelConfig(name="c", checkpoint="c1")
    changed = {"a": {"name": "a", "checkpoint": "a2"}, "b": None, "c": c.model_dump()}
    assert [(m.name, m.checkpoint) for m in overlay([a, b], changed)] == [("a", "a2"), ("c", "c1")]
    assert overlay([a, b], {}) == [a, b]
    assert fingerprint([a, b], []) != fingerprint([a, c], []) == fingerprint([a, c], [])


def test_the_state_keeps_changes_per_config_and_knows_when_every_replica_applied_them():
    state = RepositoryState()
    first = state.change("config-1", "m", {"name": "m", "checkpoint": "x"})
    assert state.get("config-1") == (first, {"m": {"name": "m", "checkpoint": "x"}})
    assert state.get("config-2") == (0, {})  # another config starts from itself
    assert state.applied("config-1", first) == (False, {})  # no replica heard from yet
    state.report("r1", "config-1", first, {})
    state.report("r2", "config-1", first - 1, {})
    assert state.applied("config-1", first) == (False, {})
    state.report("r2", "config-1", first, {"m": "cannot load"})
    assert state.applied("config-1", first) == (True, {"m": "cannot load"})
    undone = state.revert("config-1", "m", None, had=False)
    assert undone > first and state.get("config-1") == (undone, {})


def test_a_replica_applies_a_change_and_a_new_config_starts_over(tiny_checkpoints):
    m = ModelConfig(name="m", checkpoint=tiny_checkpoints["v1"], warmup_batches=0)
    served = ServedModels([m], [], ServerConfig())
    state = RepositoryState()
    sync = RepositorySync(served, state, "r1")
    sync.start_from([m], [])
    canary = m.model_dump(mode="json") | {
        "checkpoint": None,
        "versions": [
            {"version": 1, "checkpoint": tiny_checkpoints["v1"], "weight": 90},
            {"version": 2, "checkpoint": tiny_checkpoints["v2"], "weight": 10},
        ],
    }
    generation = state.change(sync.base, "m", canary)
    sync.wake()
    _until(lambda: state.applied(sync.base, generation)[0])
    assert served.models["m"].weights == {"1": 90, "2": 10}
    # a deploy of a config (here: the same model, another setting) wins over the change
    n = m.model_copy(update={"max_batch_size": 4})
    sync.configure([n], [])
    _until(lambda: served.models["m"].hosts["1"].config.max_batch_size == 4)
    assert list(served.models["m"].hosts) == ["1"]


def _until(done, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.1)
