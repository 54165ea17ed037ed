"""The models a server replica serves, and those that join it once their training is done.

One `ServedModel` per served name (`service.versions`: a `ModelHost` per version and the
weights between them), each task's default model (the first configured), the models still
training with their progress, and the thread that loads a trained one beside the others (a
redeploy would restart the replica and warm every model again). Nothing here knows HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydantic import ValidationError

from models.train.progress import read_progress

from .config import ModelConfig, ServerConfig, TrainingModel
from .errors import ModelNotFound, ModelTraining
from .host import ModelHost
from .route_table import TASK_NAMES
from .schemas import TrainingProgress
from .versions import ServedModel

JOIN_POLL_S = 1.0  # how often a replica looks for a model that finished training
logger = logging.getLogger("ray.serve")


class ServedModels:
    """The replica's models by name. The first ones load here (a bad checkpoint fails the
    replica) and warm up in the background; later ones (`update`) load and warm up beside
    those serving, and replace them only once warm."""

    def __init__(
        self, models: list[ModelConfig], training: list[TrainingModel], config: ServerConfig
    ):
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self.default: dict[str, ServedModel | None] = dict.fromkeys(TASK_NAMES)
        self.training: list[TrainingModel] = []
        self.join_errors: dict[str, str] = {}  # trained models that could not be served
        self.update_errors: dict[str, str] = {}  # updates that could not be served, by model
        self._lock = threading.Lock()  # one change at a time: each replaces the maps whole
        self._latest = 0  # the newest update asked for; an older one still waiting is dropped
        self._joining: threading.Thread | None = None
        self.start(models, training)

    def start(self, models: list[ModelConfig], training: list[TrainingModel]) -> None:
        self.training = list(training)
        served = {m.name: self._load(m) for m in models}
        # a model trained before this replica started is served as if configured
        for t in [t for t in self.training if _trained(t)]:
            trained = self._load_trained(t)
            if trained is not None:
                served[t.name] = trained
                self.training = [other for other in self.training if other is not t]
        self._publish(served)
        for host in self.hosts():
            host.start_warmup()
        self._join_in_background()

    def update(self, models: list[ModelConfig], training: list[TrainingModel]) -> None:
        """Serve `models` instead: a model whose settings or versions changed gets each changed
        version loaded and warmed up beside the one serving, and is replaced whole once they
        are warm (a version whose settings are the same keeps its host, so a change of weights
        alone is immediate); a model no longer listed stops taking requests. Requests already
        holding the old version finish on it, and it is freed with the last of them. A model
        that cannot be loaded or warmed up keeps serving as it was, with the reason in
        `update_errors`. Blocking: the replica runs it on a thread of its own."""
        self._latest += 1
        mine = self._latest
        with self._lock:
            if mine != self._latest:
                return  # a newer update follows: it is the one to apply
            current, served, errors = self.models, {}, {}
            for model in models:
                try:
                    served[model.name] = self._updated(model, current.get(model.name))
                except Exception as e:
                    logger.exception("model %r: the update cannot be served", model.name)
                    errors[model.name] = f"not updated, still serving as before: {e!r}"
                    if model.name in current:
                        served[model.name] = current[model.name]
            self.update_errors = errors
            self.training = [t for t in training if t.name not in served]
            self._publish(served)
        self._join_in_background()
        logger.info("models updated: %s", sorted(self.models))

    def _updated(self, model: ModelConfig, old: ServedModel | None) -> ServedModel:
        """The model as configured now, its new versions warm; unchanged versions keep their
        host."""
        versions, hosts, fresh = model.served_versions(), {}, []
        for v in versions:
            key, settings = str(v.version), model.of_version(v)
            kept = old.hosts.get(key) if old is not None else None
            if kept is not None and kept.config == settings:
                hosts[key] = kept
            else:
                hosts[key] = self._host(settings, key)
                fresh.append(hosts[key])
        served = ServedModel(model.name, hosts, {str(v.version): v.weight for v in versions})
        for host in fresh:
            host.start_warmup()
            host.warm.result()  # a warm-up that fails raises here: the old one stays
        return served

    def _publish(self, served: dict[str, ServedModel]) -> None:
        """Replace the maps whole (the event loop reads them while this thread writes); each
        task's default is its first model."""
        default = {
            task: next((m for m in served.values() if m.meta.task == task), None)
            for task in TASK_NAMES
        }
        self.models, self.default = served, default

    def _host(self, settings: ModelConfig, version: str) -> ModelHost:
        return ModelHost(settings, self.config.max_pixels, self.config.retry_after_s, version)

    def _load(self, model: ModelConfig) -> ServedModel:
        """Every version of a model, loaded (a bad checkpoint fails here), not warmed up."""
        versions = model.served_versions()
        hosts = {str(v.version): self._host(model.of_version(v), str(v.version)) for v in versions}
        return ServedModel(model.name, hosts, {str(v.version): v.weight for v in versions})

    def hosts(self) -> list[ModelHost]:
        """Every version of every served model."""
        return [host for served in self.models.values() for host in served.hosts.values()]

    # ------------------------------------------------------------------------ lookups

    def named(self, name: str, version: str | None = None, client: str | None = None) -> ModelHost:
        """A model by its name, of any task: the version named, or one drawn by weight."""
        served = self.served(name)
        return served.version(version) if version else served.choose(client)

    def served(self, name: str) -> ServedModel:
        """A model by its name, with all its versions."""
        served = self.models.get(name)
        if served is None:
            self._refuse_training(None, name)
            raise ModelNotFound(f"no model {name!r}; served: {sorted(self.models)}")
        return served

    def of_task(
        self, task: str, name: str | None, version: str | None = None, client: str | None = None
    ) -> ModelHost:
        """The task's model of that name, or the task's default one; the version named, or
        one drawn by weight."""
        if name is None:
            served = self.default[task]
            if served is None:
                self._refuse_training(task, None)
                raise ModelNotFound(f"no {task} model is served")
        else:
            served = self.models.get(name)
            if served is None:
                self._refuse_training(task, name)
            if served is None or served.meta.task != task:
                names = [n for n, m in self.models.items() if m.meta.task == task]
                raise ModelNotFound(f"no {task} model {name!r}; served: {names}")
        return served.version(version) if version else served.choose(client)

    def _refuse_training(self, task: str | None, name: str | None) -> None:
        """503 `model_training` for a model still training: the one named, or the task's."""
        for t in self.training:
            if (t.name == name or name is None) and task in (None, t.task):
                progress = _progress(t)
                done = "" if progress.fraction is None else f" ({progress.fraction:.0%} done)"
                raise ModelTraining(
                    f"model {t.name!r} is still training{done}; it is served once trained",
                    30 if progress.eta_s is None else int(min(max(progress.eta_s, 1), 600)),
                )

    # ------------------------------------------------------------------------- state

    def pending(self) -> list[str]:
        """The served models with a version not warm yet."""
        return sorted({host.name for host in self.hosts() if not host.ready})

    def failures(self) -> dict[str, BaseException]:
        """The model versions whose warm-up failed (by their label), with why."""
        failed = {host.label: host.failure() for host in self.hosts()}
        return {label: error for label, error in failed.items() if error is not None}

    def training_status(self) -> list[dict[str, Any]]:
        """The models still training, each with the progress its training last wrote."""
        return [_progress(t, self.join_errors.get(t.name)).model_dump() for t in self.training]

    # ------------------------------------------------------------------ joining ones

    def _joinable(self) -> list[TrainingModel]:
        return [t for t in self.training if t.serve_as and t.name not in self.join_errors]

    def _join_in_background(self) -> None:
        if self._joinable() and (self._joining is None or not self._joining.is_alive()):
            self._joining = threading.Thread(
                target=self._join_when_trained, name="join", daemon=True
            )
            self._joining.start()

    def _load_trained(self, t: TrainingModel) -> ServedModel | None:
        """A trained model, loaded; None, with the reason kept for /v1/models, when it cannot
        be loaded: the replica keeps serving the others."""
        try:
            return self._load(t.serve_as)
        except Exception as e:
            logger.exception("model %r was trained but cannot be served", t.name)
            self.join_errors[t.name] = f"trained, but cannot be served: {e!r}"
            return None

    def _join_when_trained(self) -> None:
        """Serve each model of `training` that has `serve_as` once its training says done:
        loaded and warmed up here beside the models being served, then listed with them."""
        while self._joinable():
            time.sleep(JOIN_POLL_S)
            for t in [t for t in self._joinable() if _trained(t)]:
                served = self._load_trained(t)
                if served is None:
                    continue
                try:
                    for host in served.hosts.values():
                        host.start_warmup()
                        host.warm.result()
                except Exception as e:
                    self.join_errors[t.name] = f"trained, but failed to warm up: {e!r}"
                    continue
                with self._lock:
                    self._publish({**self.models, t.name: served})
                    self.training = [other for other in self.training if other is not t]
                logger.info("model %r trained: now served", t.name)


def _trained(model: TrainingModel) -> bool:
    """Whether a model to serve once trained has finished: its training writes "done" once the
    checkpoint is complete."""
    return model.serve_as is not None and read_progress(model.progress_file).get("state") == "done"


def _progress(model: TrainingModel, join_error: str | None = None) -> TrainingProgress:
    """What a model's training last wrote, as documented (other fields left out); a file that
    is not what a training run writes reads as waiting; `join_error`: failed after all."""
    named = {"name": model.name, "task": model.task}
    if join_error is not None:
        return TrainingProgress(state="failed", error=join_error, **named)
    try:
        return TrainingProgress.model_validate({**read_progress(model.progress_file), **named})
    except ValidationError:
        return TrainingProgress(state="waiting", **named)
