"""The demo models `convnext-serve run` trains while the service already answers.

On a fresh machine the first demo model is trained before the service starts (there is nothing
to serve without one); the others train in a background process and join the running service
as each finishes. Until then each is listed under `training` in the application's args, with
the model to serve (`serve_as`): the service shows it, with its progress, in /readyz and
/v1/models, answers requests for it with 503 `model_training`, and each replica loads it in
place once its training writes "done".
"""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import model_lists

DEMO_PREFIX = "demo:"
# The background training yields the CPU to the service: on two cores, a model joining while the
# next one trained took minutes to load and warm up.
TRAINING_NICENESS = 10


def demo_task(model: dict[str, Any]) -> str | None:
    """The demo task a model of a serve config names (`checkpoint: demo:<task>`), if any."""
    spec = str(model.get("checkpoint", ""))
    return spec.removeprefix(DEMO_PREFIX) if spec.startswith(DEMO_PREFIX) else None


def demo_tasks(config: dict[str, Any]) -> list[str]:
    """The demo tasks a serve config names, in training order."""
    tasks = {
        demo_task(model)
        for app in copy.deepcopy(config)["applications"]
        for model in model_lists(app).get("models", [])
    } - {None}
    order = ["classify", "detect", "segment"]
    return sorted(tasks, key=order.index)


def with_training(config: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """`config` with the models of these demo tasks moved from `models` to `training`."""
    from models.demo import demo_checkpoint
    from models.train.progress import progress_path

    config = copy.deepcopy(config)
    for app in config["applications"]:
        lists = model_lists(app)
        later = [m for m in lists.get("models", []) if demo_task(m) in tasks]
        if not later:
            continue
        lists["models"] = [m for m in lists["models"] if m not in later]
        lists["training"] = [
            *lists.get("training", []),
            *(
                {
                    "name": m["name"],
                    "task": demo_task(m),
                    "serve_as": m,
                    "progress_file": str(progress_path(demo_checkpoint(demo_task(m)))),
                }
                for m in later
            ),
        ]
    return config


class BackgroundTraining:
    """`python -m models.demo --tasks ...` in a child process, and what it has finished."""

    def __init__(self, config: dict[str, Any], tasks: list[str], log: Path):
        self.full_config, self.waiting, self.log = config, list(tasks), log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from models.demo import demo_checkpoint
        from models.train.progress import progress_path, write_progress

        for task in self.waiting:  # not what an earlier run left there
            write_progress(progress_path(demo_checkpoint(task)), state="waiting")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "models.demo",
                    "--nice",
                    str(TRAINING_NICENESS),
                    "--tasks",
                    *self.waiting,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def config(self) -> dict[str, Any]:
        """The serve config now: the finished models served, the others still training."""
        return with_training(self.full_config, self.waiting)

    def finished(self) -> list[str]:
        """The tasks whose models were trained since the last call."""
        from models.demo import demo_checkpoint, is_usable
        from models.train.progress import progress_path, read_progress

        def trained(task: str) -> bool:  # "done" is written once the checkpoint is complete
            path = demo_checkpoint(task)
            return read_progress(progress_path(path)).get("state") == "done" and is_usable(path)

        done = [t for t in self.waiting if trained(t)]
        self.waiting = [t for t in self.waiting if t not in done]
        return done

    def failed(self) -> int | None:
        """The training process's exit code when it stopped with models untrained."""
        if self.proc is None or self.proc.poll() is None or not self.waiting:
            return None
        return self.proc.returncode

    def stop(self) -> None:
        """Interrupt the training (as Ctrl-C would) and wait for it a little."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
