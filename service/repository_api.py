"""The Open Inference Protocol's model repository extension (`/v2/repository`), as Triton
answers it, so `tritonclient`'s `get_model_repository_index`, `load_model` and `unload_model`
work unchanged: thin handlers over the replica's `RepositorySync` (`service.repository`).

Off unless admin keys are set; a checkpoint loads only from under the model roots. A load or
unload answers once every replica serves the change, or with the reason it could not be
served (the versions serving stay).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .body import read_body
from .config import ModelConfig
from .data_plane import DataPlane
from .errors import InvalidParameter, ModelNotFound, Timeout
from .pipelines import VERSION
from .protocol_models import readiness
from .repository import check_checkpoint, overlay

router = APIRouter(prefix="/v2/repository", tags=["Model repository"])


def _plane(request: Request) -> DataPlane:
    return request.app.state.plane


@router.post("/index", summary="Every model of the repository, its versions and their state")
async def index(request: Request) -> JSONResponse:
    return JSONResponse(repository_index(_plane(request)))


@router.post("/models/{name}/load", summary="Load a model, or new versions or settings of it")
async def load(request: Request, name: str) -> Response:
    """Without a body: serve the model as the config has it. With `parameters.config`, a JSON
    object of the model's settings (`checkpoint`, or `versions` with their checkpoints and
    weights, ...) over those it has now."""
    plane = _plane(request)
    await load_model(plane, name, _config_of(await read_body(request, plane.config)))
    return JSONResponse({})


@router.post("/models/{name}/unload", summary="Stop serving a model")
async def unload(request: Request, name: str) -> Response:
    plane = _plane(request)
    await read_body(request, plane.config)  # tritonclient sends its parameters; none apply
    await unload_model(plane, name)
    return JSONResponse({})


def repository_index(plane: DataPlane) -> list[dict[str, Any]]:
    """Every model version served, with its state; configured models not served; models
    whose last update could not be served, with the reason; the pipelines, as Triton lists
    its ensembles (ready when all their models are)."""
    sync = plane.repository
    entries: list[dict[str, Any]] = []
    for served in plane.models.models.values():
        for version, host in served.hosts.items():
            state = "READY" if host.ready else "LOADING"
            entries.append({"name": served.name, "version": version, "state": state})
    served_names = set(plane.models.models)
    configured = [m.name for m in sync.models] if sync is not None else []
    for name in configured:
        if name not in served_names:
            entries.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})
    for name, reason in plane.models.update_errors.items():
        entries.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
    for name in plane.pipelines:
        _, ready = readiness(plane, name, None)
        entries.append({"name": name, "version": VERSION, "state": "READY" if ready else "LOADING"})
    return entries


async def load_model(plane: DataPlane, name: str, given: dict[str, Any] | None) -> None:
    """Serve a model as the config has it (`given` None), or with the `given` settings over
    its current ones, once every replica serves it."""
    sync = plane.repository
    _, changes = await _ask(sync.state.get, sync.base)
    current = {m.name: m for m in overlay(sync.models, changes)}
    configured = {m.name: m for m in sync.models}
    # without settings: as the config has it, dropping earlier loads' (Triton reloads the
    # repository's own config); with them: over what serves now
    if given is None:
        base = configured.get(name) or current.get(name)
    else:
        base = current.get(name) or configured.get(name)
    if base is None and given is None:
        raise ModelNotFound(f"no model {name!r} in the config; give its settings in `config`")
    settings = base.model_dump() if base is not None else {}
    if given is not None:
        if "versions" in given:
            settings["checkpoint"] = None
        if "checkpoint" in given:
            settings["versions"] = None
        settings.update(given)
    settings["name"] = name
    try:
        model = ModelConfig.model_validate(settings)
    except ValidationError as e:
        raise InvalidParameter(f"model {name!r}: {e.errors()[0]['msg']}") from None
    if given is not None:
        # what the config (or an earlier load) serves is trusted as it is; the rest must lie
        # under the model roots
        served = [*sync.models, *current.values()]
        known = {v.checkpoint for m in served for v in m.served_versions()}
        for version in model.served_versions():
            if version.checkpoint in known:
                continue
            path = check_checkpoint(version.checkpoint, plane.config.model_roots)
            if not path.is_file():
                raise InvalidParameter(f"no checkpoint file at {version.checkpoint!r}")
    await _change(plane, name, model.model_dump(mode="json"), changes)


async def unload_model(plane: DataPlane, name: str) -> None:
    """Stop serving a model, once every replica has."""
    sync = plane.repository
    _, changes = await _ask(sync.state.get, sync.base)
    if name not in {m.name for m in overlay(sync.models, changes)}:
        raise ModelNotFound(f"no model {name!r} is served")
    await _change(plane, name, None, changes)


def _config_of(body: bytes) -> dict[str, Any] | None:
    """The `parameters.config` of a load request's JSON body, or None."""
    if not body.strip():
        return None
    try:
        config = (json.loads(body).get("parameters") or {}).get("config")
    except (ValueError, AttributeError):
        raise InvalidParameter("a load request is a JSON object") from None
    return None if config is None else config_json(config)


def config_json(config: Any) -> dict[str, Any]:
    """A load request's `config`: a JSON object of the model's settings (as a string, as
    Triton's clients send it)."""
    try:
        given = json.loads(config) if isinstance(config, str) else config
    except ValueError:
        given = None
    if not isinstance(given, dict):
        raise InvalidParameter("`config` is a JSON object of the model's settings")
    return given


async def _change(plane: DataPlane, name: str, settings: dict | None, changes: dict) -> None:
    """Record a change and wait until every replica serves it; one that could not be served
    is undone (the versions serving stay) and answered with the reason."""
    sync, timeout = plane.repository, plane.config.repository_timeout_s
    generation = await _ask(sync.state.change, sync.base, name, settings)
    sync.wake()
    errors = await _wait_applied(sync, generation, timeout)
    if name in errors:
        undone = await _ask(sync.state.revert, sync.base, name, changes.get(name), name in changes)
        sync.wake()
        await _wait_applied(sync, undone, timeout)
        raise InvalidParameter(f"model {name!r} could not be served: {errors[name]}")


async def _wait_applied(sync, generation: int, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, errors = await _ask(sync.state.applied, sync.base, generation)
        if done:
            return errors
        await asyncio.sleep(0.25)
    raise Timeout(f"the change was not served by every replica within {timeout_s:g} s")


async def _ask(method, *args):
    """A method of the repository state: an actor's (awaited through Ray) or a plain one's."""
    remote = getattr(method, "remote", None)
    return await remote(*args) if remote is not None else method(*args)
