"""How far a training run is, in a small JSON file beside its checkpoint, for whoever waits on
it: `convnext-serve run` shows a demo model still training, with its progress, in `/readyz`,
`/v1/models` and its banner.

`<out stem>.progress.json` holds `state` (synthesising, training, done or failed), and while
training `epoch`, `epochs`, `fraction` (0-1) and `eta_s`; `updated` is a Unix time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def progress_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".progress.json")


def write_progress(path: Path, **fields: Any) -> None:
    """Replace the file atomically: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**fields, "updated": time.time()}))
    os.replace(tmp, path)


def read_progress(path: str | Path) -> dict[str, Any]:
    """The last progress written, or `{"state": "waiting"}` before the run writes any."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"state": "waiting"}
    return data if isinstance(data, dict) else {"state": "waiting"}


class ProgressFile:
    """Writes a run's progress at most every `every_s` seconds (and always on the last step)."""

    def __init__(
        self,
        path: Path,
        epochs: int,
        steps_per_epoch: int,
        start_epoch: int = 0,
        every_s: float = 2.0,
    ):
        self.path, self.epochs, self.steps = path, epochs, max(1, steps_per_epoch)
        self.done_at_start = start_epoch * self.steps
        self.total = epochs * self.steps
        self.every_s, self.started, self.last = every_s, time.monotonic(), 0.0

    def step(self, epoch: int, step: int) -> None:
        """After `step` (0-based) of `epoch` (0-based)."""
        now = time.monotonic()
        done = epoch * self.steps + step + 1
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        fraction = done / self.total
        this_run = (done - self.done_at_start) / max(1, self.total - self.done_at_start)
        elapsed = now - self.started
        eta = elapsed * (1 - this_run) / this_run if this_run > 0 else None
        eta_s = None if eta is None else round(eta)
        write_progress(
            self.path,
            state="training",
            epoch=epoch + 1,
            epochs=self.epochs,
            fraction=round(fraction, 4),
            eta_s=eta_s,
        )
