"""The server deployment's options, derived from the models' settings (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from service.app import _gpus_per_replica, server_autoscaling
from service.config import AppConfig


def config(*models: dict, **server) -> AppConfig:
    named = [{"name": f"m{i}", "checkpoint": "demo:classify", **m} for i, m in enumerate(models)]
    return AppConfig.from_args({"models": named, "server": server})


def test_autoscaling_spans_the_models_and_sums_their_targets():
    """A replica holds every model: it scales between the largest minimum and the largest
    maximum, aiming at the sum of the models' requests in flight."""
    assert server_autoscaling(config({}, {"num_replicas": 3})) is None
    merged = server_autoscaling(
        config(
            {
                "autoscaling_config": {
                    "min_replicas": 2,
                    "max_replicas": 4,
                    "target_ongoing_requests": 8,
                    "upscale_delay_s": 5,
                }
            },
            {
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 6,
                    "target_ongoing_requests": 4,
                }
            },
            {},
        )
    )
    assert merged == {
        "min_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 12,
        "upscale_delay_s": 5,
    }
    only_bounds = server_autoscaling(
        config({"autoscaling_config": {"max_replicas": 3}}, num_replicas=2)
    )
    assert only_bounds == {"min_replicas": 2, "max_replicas": 3}
    # the server's own (its models under the user_config): the models' merge over it
    server = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 24}
    assert server_autoscaling(config(autoscaling_config=server)) == server
    merged = server_autoscaling(
        config({"autoscaling_config": {"max_replicas": 2}}, autoscaling_config=server)
    )
    assert merged == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 24}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU case: this machine has one")
def test_a_replica_asks_for_gpus_only_where_a_model_runs_on_one():
    """Without Ray started and without CUDA, a replica takes no GPU unless a model asks for one
    (the most any asks for) or is forced onto CUDA (a whole one)."""
    assert _gpus_per_replica(config({}, {})) == 0.0
    assert _gpus_per_replica(config({"num_gpus": 0.25}, {"num_gpus": 0.5}, {})) == 0.5
    assert _gpus_per_replica(config({"device": "cuda"}, {})) == 1.0
    assert _gpus_per_replica(config({"device": "cpu"})) == 0.0
    assert _gpus_per_replica(config({"device": "cpu"}, num_gpus=0.5)) == 0.5  # the server's


def test_a_replica_takes_a_gpu_for_the_models_of_its_user_config(monkeypatch):
    """Built with no models in `args` (they come with the user_config), a replica on a
    cluster with GPUs takes one, unless the environment keeps the models on the CPU."""
    import ray

    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False)  # GPUs as Ray counts them
    try:
        assert _gpus_per_replica(config()) == 1.0
        assert _gpus_per_replica(config({"device": "cpu"})) == 0.0
        monkeypatch.setenv("CONVNEXT_SERVE_DEVICE", "cpu")
        assert _gpus_per_replica(config()) == 0.0
    finally:
        ray.shutdown()


def test_models_under_the_servers_user_config_replace_those_of_args():
    """What `convnext-serve run` sizes HAProxy's limits from: the models a config's `server`
    deployment lists in its user_config (the form Serve updates in place), over args'."""
    from service.config import app_configs, served_models

    user_config = {"models": [{"name": "u", "checkpoint": "demo:classify", "max_batch_size": 2}]}
    app = {
        "name": "convnext-serve",
        "import_path": "service.app:build_app",
        "args": {"models": [{"name": "a", "checkpoint": "demo:classify"}]},
        "deployments": [{"name": "server", "user_config": user_config}],
    }
    [found] = app_configs({"applications": [app]})
    assert [m.name for m in found.models] == ["u"]
    assert found.server_capacity() == 32 + 64  # u's 32 calls and 64 waiting
    with pytest.raises(ValueError, match="no models"):
        served_models({"models": []})
    with pytest.raises(ValueError, match="takes `models`, `training` and `pipelines`, not"):
        served_models({**user_config, "replicas": 2})
    with pytest.raises(ValueError, match="must be unique"):
        served_models({"models": user_config["models"] * 2})
    # what sizes the replicas is read when the application is built: refused here, by name
    for sizing in ({"num_cpus": 2}, {"num_gpus": 1}, {"autoscaling_config": {}}):
        sized = [{**user_config["models"][0], **sizing}]
        with pytest.raises(ValueError, match=f"'u': {next(iter(sizing))} size the replicas"):
            served_models({"models": sized})
