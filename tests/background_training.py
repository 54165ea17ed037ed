"""The suite's trained models, made by one low-priority process while the other tests run.

A cold run (CI, a fresh `$CONVNEXT_SERVE_TEST_CACHE`) must train the service tests' models and
the demo models before the tests that serve them. Trained in the foreground, that time adds to
the suite's; the service tests leave much of the CPU idle (they wait on processes starting, on
HTTP and on timeouts). So the test run starts one process at the lowest priority (nice 19) that
trains what is missing, in the order the tests want it, and the tests that need a group of
models (`@pytest.mark.needs_models("service" | "demo")`) run after the others, the service
group first, each waiting only for its own files. Run as `python -m tests.background_training
GROUP...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import demo_models, service_models

# group: (its checkpoint files, the function that trains whatever of them is missing)
GROUPS: dict[str, tuple[Callable[[], list[Path]], Callable[[], dict]]] = {
    "service": (service_models.checkpoint_paths, service_models.service_checkpoints),
    "demo": (demo_models.checkpoint_paths, demo_models.demo_checkpoints),
}
ORDER = list(GROUPS)  # the service tests come before the demo ones

_process: subprocess.Popen | None = None


def missing(group: str) -> bool:
    paths, _ = GROUPS[group]
    return not all(p.is_file() for p in paths())


def start(groups: set[str]) -> None:
    """Train the missing groups of `groups` in the background (nothing to do when cached)."""
    global _process
    todo = [g for g in ORDER if g in groups and missing(g)]
    if not todo or _process is not None:
        return
    log = service_models.cache_root() / "background-training.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # PASSIVE: a torch thread that waits at a barrier sleeps instead of spinning; at nice 19
    # its partner thread is often off the CPU, and spinning would burn what little it gets
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "ab") as out:
        _process = subprocess.Popen(
            [sys.executable, "-m", "tests.background_training", *todo],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            preexec_fn=lambda: os.nice(19),
        )


def wait_for(group: str) -> None:
    """Wait while the background process may still make `group`; the caller then trains in
    the foreground whatever it did not make (a run without it, or one where it failed)."""
    while _process is not None and _process.poll() is None and missing(group):
        time.sleep(1)


def stop() -> None:
    """End the background training (a selection that stopped early); a later run resumes it."""
    global _process
    if _process is not None and _process.poll() is None:
        _process.terminate()
        try:
            _process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _process.kill()
            _process.wait()
    _process = None


if __name__ == "__main__":
    for name in sys.argv[1:]:
        GROUPS[name][1]()
