"""The model repository: changes to the served models made through the protocol's repository
API (load, unload), shared by every replica of the application and applied by each in place.

The serve config says which models are served; a repository change is kept beside it, for
that config: a deploy of another config starts from that config again (the config wins). The
changes live in one small Ray actor per application (`RepositoryState`), which each replica
polls; each applies them with `ServedModels.update` (loaded and warmed beside the versions
serving, swapped in once warm) and reports back, so a load call can wait until every replica
serves the change. Outside Ray (a replica's code run in-process), the state is a plain object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .config import ModelConfig, TrainingModel
from .errors import Forbidden
from .served_models import ServedModels

POLL_S = 0.5  # how often a replica looks for changes
SEEN_S = 10.0  # a replica not heard from for this long no longer counts as serving
logger = logging.getLogger("ray.serve")


class RepositoryState:
    """The changes made to each config's models (by the config's fingerprint), and what each
    replica has applied: {model: its settings, or None where unloaded}."""

    def __init__(self):
        self.changes: dict[str, dict[str, dict | None]] = {}
        self.generation: dict[str, int] = {}
        self.replicas: dict[str, tuple[str, int, dict[str, str], float]] = {}

    def get(self, base: str) -> tuple[int, dict[str, dict | None]]:
        return self.generation.get(base, 0), dict(self.changes.get(base, {}))

    def change(self, base: str, name: str, settings: dict | None) -> int:
        """Record a change (settings, or None: unloaded); its generation."""
        self.changes.setdefault(base, {})[name] = settings
        self.generation[base] = self.generation.get(base, 0) + 1
        return self.generation[base]

    def revert(self, base: str, name: str, before: dict | None, had: bool) -> int:
        """Undo a change that could not be served."""
        if had:
            self.changes.setdefault(base, {})[name] = before
        else:
            self.changes.get(base, {}).pop(name, None)
        self.generation[base] = self.generation.get(base, 0) + 1
        return self.generation[base]

    def report(self, replica: str, base: str, generation: int, errors: dict[str, str]) -> None:
        self.replicas[replica] = (base, generation, errors, time.time())

    def applied(self, base: str, generation: int) -> tuple[bool, dict[str, str]]:
        """Whether every replica serving this config (heard from lately) has applied the
        generation, and the update errors they report."""
        now = time.time()
        mine = [r for r in self.replicas.values() if r[0] == base and now - r[3] < SEEN_S]
        errors = {name: e for r in mine for name, e in r[2].items()}
        return bool(mine) and all(r[1] >= generation for r in mine), errors


def fingerprint(models: list[ModelConfig], training: list[TrainingModel]) -> str:
    """The fingerprint of a config's models: repository changes belong to one config."""
    dumped = [[m.model_dump(mode="json") for m in models]]
    dumped.append([t.model_dump(mode="json") for t in training])
    blob = json.dumps(dumped, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def overlay(models: list[ModelConfig], changes: dict[str, dict | None]) -> list[ModelConfig]:
    """The config's models with the repository's changes: changed ones replaced, unloaded ones
    left out, loaded ones added, in the config's order."""
    out = []
    for model in models:
        if model.name not in changes:
            out.append(model)
        elif changes[model.name] is not None:
            out.append(ModelConfig.model_validate(changes[model.name]))
    listed = {m.name for m in models}
    for name, settings in changes.items():
        if name not in listed and settings is not None:
            out.append(ModelConfig.model_validate(settings))
    return out


def check_checkpoint(spec: str, roots: list[str]) -> Path:
    """A checkpoint a repository call names: a file under one of the model roots (symlinks
    resolved), nothing else; refused with 403 and the reason."""
    if not roots:
        raise Forbidden("no model roots are set (`server.model_roots`): nothing may be loaded")
    if "://" in spec or ":" in spec.split("/", 1)[0]:
        raise Forbidden(f"{spec!r}: only files under the model roots load, not URLs or specs")
    path = Path(os.path.realpath(spec))
    for root in roots:
        if path.is_relative_to(os.path.realpath(root)):
            return path
    raise Forbidden(f"{spec!r} is outside the model roots {roots} (symlinks resolved)")


class RepositorySync:
    """A replica's side: applies the config's models with the repository's changes, from one
    thread, whenever either changes; reports what it applied."""

    def __init__(self, served: ServedModels, state: Any, replica: str):
        self.served, self.state, self.replica = served, state, replica
        self.models: list[ModelConfig] = []
        self.training: list[TrainingModel] = []
        self.base = ""
        self.applied = -1
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, models: list[ModelConfig], training: list[TrainingModel]) -> None:
        """A new config (from `reconfigure`): applied in the background, with this config's
        repository changes (none, for a config not seen before)."""
        self.models, self.training = models, training
        self.base = fingerprint(models, training)
        self.applied = -1
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="repository", daemon=True)
            self._thread.start()

    def start_from(self, models: list[ModelConfig], training: list[TrainingModel]) -> None:
        """The replica's first config, already served (`ServedModels.start`): keep it, and
        apply repository changes made for it before this replica started."""
        self.models, self.training = models, training
        self.base = fingerprint(models, training)
        self.applied = 0
        self._thread = threading.Thread(target=self._run, name="repository", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for changes now, not at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(POLL_S)
            self._wake.clear()
            try:
                base = self.base
                generation, changes = _call(self.state.get, base)
                if generation != self.applied:
                    self.served.update(overlay(self.models, changes), self.training)
                    self.applied = generation
                _call(
                    self.state.report, self.replica, base, self.applied, self.served.update_errors
                )
            except Exception:
                logger.exception("the model repository could not be read; trying again")
                time.sleep(POLL_S)


def _call(method, *args):
    """A method of the repository state: an actor's (through Ray) or a plain object's."""
    remote = getattr(method, "remote", None)
    if remote is None:
        return method(*args)
    import ray

    return ray.get(remote(*args), timeout=30)
