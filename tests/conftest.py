import pytest
import torch

pytest_plugins = ["tests.tiny_models"]  # the tiny checkpoints of the in-process tests


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight away from its init so each branch matters in a comparison.

    Layer scale starts at 1e-6 (blocks would be near-identity) and norms at 1/0: without this a
    wrong mapping of those tensors could go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("gamma", "layer_scale")):
                p.copy_(0.5 * noise)
            elif name.endswith("weight") and bool(torch.all(p == 1)):  # norm weights
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.add_(0.02 * noise)
    return model


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------- trained models, in order

MODEL_GROUPS = {"service": 1, "demo": 2}  # run after the tests that need no trained model


def _model_group(item: pytest.Item) -> int:
    marker = item.get_closest_marker("needs_models")
    return MODEL_GROUPS[marker.args[0]] if marker else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """After pytest-randomly's shuffle (a stable sort keeps its order within each group): the
    tests that need no trained model, then those of the service models, then the demo
    models', so that a cold run trains them in the background meanwhile."""
    items.sort(key=_model_group)


def pytest_collection_finish(session: pytest.Session) -> None:
    from . import background_training

    if session.config.option.collectonly:
        return
    needed = {m.args[0] for item in session.items for m in item.iter_markers("needs_models")}
    background_training.start(needed)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from . import background_training

    background_training.stop()
