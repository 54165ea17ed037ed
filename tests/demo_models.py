"""The demo models as `make run` trains them, for the tests of what a person first sees.

Trained once with `models.demo`'s own recipes and cached under `$CONVNEXT_SERVE_TEST_CACHE`
(default ~/.cache/convnext-serve/test-models), keyed by a hash of the recipes and the data
generator, so a repeated local run starts at once and a fresh CI machine trains them as a
fresh install does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import models.data
import models.demo
from models.demo import DEMO_INIT, DEMO_RECIPES, build_demo_models, demo_checkpoint

from .service_models import cache_root


def _fingerprint() -> str:
    digest = hashlib.sha256(json.dumps([DEMO_RECIPES, DEMO_INIT], sort_keys=True).encode())
    for module in (models.data, models.demo):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _folder() -> Path:
    return cache_root() / "demo" / _fingerprint()


def checkpoint_paths() -> list[Path]:
    return [demo_checkpoint(task, _folder()) for task in DEMO_RECIPES]


def demo_checkpoints() -> dict[str, Path]:
    """{task: checkpoint path} of the three demo models, training whatever is not cached (or
    waiting for the test run's background training to make it: `background_training`)."""
    from .background_training import wait_for

    wait_for("demo")
    return build_demo_models(_folder())
