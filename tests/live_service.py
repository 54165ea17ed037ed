"""`convnext-serve run` started as a user starts it, for the end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from .ports import free_port

API_KEY = "test-key-123"
AUTH = {"X-API-Key": API_KEY}


def server_replicas(pid: int) -> list[psutil.Process]:
    """The server replicas' processes of the `convnext-serve run` with this pid."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ServeReplica:convnext-serve:server" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return found


class Service:
    def __init__(self, url: str, metrics_url: str, proc: subprocess.Popen, log_path):
        self.url, self.metrics_url, self.proc, self.log_path = url, metrics_url, proc, log_path
        # (/healthz, /readyz, the protocol's /v2/health/ready) seen while starting
        self.readiness: list[tuple[int, int, int]] = []

    def post(self, path: str, images=(), params=None, headers=AUTH, **kw) -> requests.Response:
        files = [("image", (f"{i}.bin", data)) for i, data in enumerate(images)]
        return requests.post(
            self.url + path, files=files or None, params=params, headers=headers, timeout=120, **kw
        )

    def metrics(self) -> str:
        return requests.get(self.metrics_url, timeout=10).text


def get_json(url: str, status: int = 200, **kw) -> dict:
    """GET `url`; asserts the status (an error body must not pass for an answer), returns the
    JSON."""
    r = requests.get(url, timeout=10, **kw)
    assert r.status_code == status, (url, r.status_code, r.text[:500])
    return r.json()


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return 0


def proxy_ports_env() -> dict[str, str]:
    """Free ports for what Ray's HAProxy and its fallback proxy would take at fixed ones, so
    that two services (two test runs) on one machine do not collide."""
    names = (
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    )
    return {name: str(free_port()) for name in names}


def run_service(
    folder: Path,
    models: list[dict],
    limits: dict,
    extra: dict | None = None,
    training: list[dict] | None = None,
    env: dict[str, str] | None = None,
    pipelines: list[dict] | None = None,
) -> Iterator[Service]:
    """The service with these models and server settings (`limits`; API keys on; `extra`: more
    of the serve config; `training`: models listed as still training; `env`: more of the
    environment; `pipelines`: the config's), until the caller is done; fails the test with the
    service's log when it does not become ready."""
    port, metrics_port = free_port(), free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "convnext-serve",
                "route_prefix": "/",
                "import_path": "service.app:build_app",
                "args": {
                    "server": limits,
                    "models": models,
                    "training": training or [],
                    "pipelines": pipelines or [],
                },
            }
        ],
        **(extra or {}),
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    log_path = folder / "service.log"
    env = {
        **os.environ,
        "CONVNEXT_SERVE_API_KEYS": f"other-key,{API_KEY}",
        **proxy_ports_env(),
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "--config",
        str(folder / "config.yaml"),
        "--metrics-port",
        str(metrics_port),
        "--num-cpus",
        "8",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    svc = Service(url, f"http://127.0.0.1:{metrics_port}/metrics", proc, log_path)
    svc.haproxy_stats_url = f"http://127.0.0.1:{env['RAY_SERVE_HAPROXY_STATS_PORT']}/stats;csv"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            seen = tuple(
                _status(url + path) for path in ("/healthz", "/readyz", "/v2/health/ready")
            )
            svc.readiness.append(seen)
            if seen[1] == 200:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the service did not become ready:\n{log_path.read_text()[-3000:]}")
        svc.children = psutil.Process(proc.pid).children(recursive=True)
        yield svc
    finally:
        if proc.poll() is None:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it; killed if it has not stopped 90 s later (a test that checks
    the exit code then fails), so no run outlives its test."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def closed_loop(
    url: str,
    body: bytes,
    clients: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    side: Callable[[], None] | None = None,
    pause_s: float = 0.0,
) -> list[tuple[float, int | str, float, dict]]:
    """`clients` threads posting `body` (an image/jpeg) to `url` for `seconds`, each sending
    its next request when the last is answered: (start, status or the error, latency, response
    headers) of every request; `side` runs on the side a third of the way in."""
    started = time.monotonic()
    results: list[tuple[float, int | str, float, dict]] = []
    headers = {**(headers or {}), "Content-Type": "image/jpeg"}

    def client() -> None:
        session = requests.Session()
        while time.monotonic() - started < seconds:
            t = time.monotonic()
            try:
                r = session.post(url, data=body, timeout=60, headers=headers)
                results.append((t - started, r.status_code, time.monotonic() - t, r.headers))
            except requests.RequestException as e:
                error = f"{type(e).__name__}: {e}"[:300]
                results.append((t - started, error, time.monotonic() - t, {}))
            time.sleep(pause_s)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if side is not None:
        time.sleep(seconds / 3)
        side()
    for thread in threads:
        thread.join()
    return results


def request_counts(service: Service, by: tuple[str, ...], **match: str) -> dict[tuple, float]:
    """`convnext_serve_requests_total`, summed by the labels `by`, over the series whose
    labels equal `match` (each label read as a label of its own: Ray adds others, such as
    `otel_scope_version`, whose names end like ours)."""
    counts: dict[tuple, float] = {}
    for line in service.metrics().splitlines():
        if not line.startswith("ray_convnext_serve_requests_total{"):
            continue
        labels = dict(re.findall(r'[{,](\w+)="([^"]*)"', line))
        if all(labels.get(k) == v for k, v in match.items()):
            key = tuple(labels.get(name, "") for name in by)
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def counted_since(
    service: Service, before: dict[tuple, float], wanted: dict[tuple, float], by, **match
) -> dict[tuple, float]:
    """How many requests of each `wanted` key were counted since `before`, once that is
    `wanted` or 60 s have passed (the counter is reported every second, exported later)."""
    deadline = time.monotonic() + 60
    while True:
        after = request_counts(service, by, **match)
        seen = {k: after.get(k, 0) - before.get(k, 0) for k in wanted}
        if seen == wanted or time.monotonic() > deadline:
            return seen
        time.sleep(1)
