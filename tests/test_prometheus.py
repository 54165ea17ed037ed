"""A real Prometheus scraping the real service (docs/operations.md).

Starts `convnext-serve run` with the project's serve config (deploy/serve_config.yaml, its demo
checkpoints swapped for small untrained ones made here) and a Prometheus with the project's scrape
config (deploy/prometheus/prometheus.yml, its target pointed at the service's metrics port on
127.0.0.1), sends classify/detect/segment traffic and asks Prometheus's HTTP API that:
the target is up, every metric of docs/operations.md has samples with its labels, and every query
of the Grafana dashboard returns data, so no panel is empty or misspelled.

Takes about two minutes (the service needs ~1 min to start on 2 CPUs). Everything listens on
127.0.0.1 (Ray's metrics agent binds all interfaces; only the loopback address is used).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from service.config import model_lists
from tests.live_service import proxy_ports_env
from tests.ports import free_port
from tests.test_deploy import DEPLOY, dashboard_queries, promql_metric_names

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="the prometheus binary is missing (.ci/run installs Debian's prometheus package)",
    ),
]

SCRAPE_INTERVAL = "2s"  # the project's config says 15s; shorter here so the test is quick
RATE_WINDOW = "1m"  # what the dashboard's $__rate_interval stands for in these queries
READY_TIMEOUT_S = 300
DATA_TIMEOUT_S = 120

# docs/operations.md: every series name and the labels it must carry.
DOCUMENTED_METRICS = {
    "ray_convnext_serve_requests_total": ("endpoint", "model", "status"),
    "ray_convnext_serve_request_duration_seconds_bucket": ("endpoint", "model", "le"),
    "ray_convnext_serve_images_total": ("model",),
    "ray_convnext_serve_batch_size_bucket": ("model", "le"),
    "ray_convnext_serve_batch_inference_seconds_bucket": ("model", "le"),
    "ray_convnext_serve_queue_wait_seconds_bucket": ("model", "le"),
    "ray_convnext_serve_decode_seconds_bucket": ("endpoint", "le"),
    "ray_convnext_serve_in_flight_requests": ("endpoint",),
    "ray_convnext_serve_model_info": ("model", "arch", "task", "device", "precision"),
}
GPU_METRICS = {
    "ray_node_gpus_utilization",
    "ray_node_gpus_available",
    "ray_node_gram_used",
    "ray_node_gram_available",
}


def make_checkpoints(folder: Path) -> dict[str, Path]:
    """Small untrained models for the three tasks (the demo models take half an hour to train)."""
    from models import build_model, save_checkpoint
    from models.checkpoint import CheckpointMeta, Provenance

    labels = ["circle", "square"]
    common = {"num_classes": 2, "labels": labels, "provenance": Provenance(source="trained")}
    specs = {
        "classify": ("convnext_atto", "linear", 64, {}),
        "detect": ("maskrcnn_convnext_atto", "maskrcnn", 96, {"min_size": 96, "max_size": 96}),
        # a narrow UperNet head (64 channels, not 512): 16 MB instead of 128 MB, and quick
        "segment": ("upernet_convnext_atto", "upernet", 64, {"channels": 64, "aux_channels": 32}),
    }
    paths = {}
    for task, (arch, head, size, kwargs) in specs.items():
        meta = dict(common)
        if task == "segment":
            meta.update(num_classes=3, labels=["background", *labels])
        model = build_model(arch, num_classes=meta["num_classes"], **kwargs).eval()
        paths[task] = save_checkpoint(
            model,
            folder / f"{task}.safetensors",
            CheckpointMeta(
                task=task, arch=arch, head=head, image_size=size, model_kwargs=kwargs, **meta
            ),
        )
    return paths


PIPELINE = "shapes-inside-boxes"  # the shipped config's


def serve_config_for(checkpoints: dict[str, Path]) -> dict:
    """deploy/serve_config.yaml with the test's checkpoints in place of the demo models."""
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    for app in config["applications"]:
        for model in model_lists(app)["models"]:
            task = model["checkpoint"].removeprefix("demo:")
            model["checkpoint"] = str(checkpoints[task])
            model["warmup_batches"] = 1
        for pipeline in model_lists(app)["pipelines"]:
            pipeline["score_threshold"] = 0.0  # this untrained detector's boxes go on too
    return config


def prometheus_config(metrics_port: int) -> dict:
    """deploy/prometheus/prometheus.yml with every target rewritten to the loopback port."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{metrics_port}" for _ in static["targets"]]
    return config


def image_bytes(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def post(url: str, files: list[tuple[str, bytes, str]] | None = None, raw=None) -> int:
    """POST images (multipart `image` fields, or one raw body); returns the status code."""
    if files is not None:
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
            + data
            + b"\r\n"
            for name, data, ctype in files
        ]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        ctype = f"multipart/form-data; boundary={boundary}"
    else:
        body, ctype = raw
    request = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def send_round(base: str, seed: int) -> list[int]:
    """One request of each kind: classify (2 images), detect, segment, the pipeline, and one
    bad image (400)."""
    png = image_bytes("PNG", (120, 90), seed)
    jpeg = image_bytes("JPEG", (100, 80), seed + 1)
    return [
        post(
            f"{base}/v1/classify?top_k=2",
            files=[("a.png", png, "image/png"), ("b.jpg", jpeg, "image/jpeg")],
        ),
        post(f"{base}/v1/detect", raw=(png, "image/png")),
        post(f"{base}/v1/segment", files=[("c.jpg", jpeg, "image/jpeg")]),
        post(f"{base}/v1/pipelines/{PIPELINE}", raw=(png, "image/png")),
        post(f"{base}/v1/classify", raw=(b"not an image", "image/png")),
    ]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(what: str, check, timeout_s: float, logs: list[Path], interval: float = 1.0):
    """Poll `check()` until it returns something truthy; fail with the logs' tails otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
        time.sleep(interval)


def stop(proc: subprocess.Popen | None, sig: int, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: this process group is ours
        proc.wait(10)


class Stack:
    def __init__(self, serve_url: str, prom_url: str, logs: list[Path]):
        self.serve_url, self.prom_url, self.logs = serve_url, prom_url, logs

    def query(self, promql: str) -> list[dict]:
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = get_json(url)
        assert answer["status"] == "success", f"{promql}: {answer}"
        return answer["data"]["result"]

    def has_data(self, promql: str) -> bool:
        """At least one series with a finite value (histogram_quantile of no traffic is NaN)."""
        return any(math.isfinite(float(r["value"][1])) for r in self.query(promql))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    port, metrics_port, prom_port = free_port(), free_port(), free_port()
    config = tmp / "serve_config.yaml"
    config.write_text(yaml.safe_dump(serve_config_for(make_checkpoints(tmp))))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(metrics_port)))
    serve_log, prom_log = tmp / "convnext-serve.log", tmp / "prometheus.log"
    logs = [serve_log, prom_log]
    cli = Path(sys.executable).parent / "convnext-serve"
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "service.cli"]
    env = {
        **os.environ,
        **proxy_ports_env(),
        "RAY_USAGE_STATS_ENABLED": "0",
        "CONVNEXT_SERVE_DEVICE": "cpu",
    }
    serve = prom = None
    stop_traffic = threading.Event()
    traffic = None
    try:
        with serve_log.open("wb") as out:
            serve = subprocess.Popen(
                [
                    *command,
                    "run",
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--metrics-port",
                    str(metrics_port),
                    "--num-cpus",
                    "4",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        with prom_log.open("wb") as out:
            prom = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        serve_url, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"

        def ready(url):
            def check():
                for proc, log in ((serve, serve_log), (prom, prom_log)):
                    if proc.poll() is not None:
                        pytest.fail(
                            f"{log.name}: exited {proc.returncode}\n{log.read_text()[-3000:]}"
                        )
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status == 200

            return check

        wait_for("Prometheus /-/ready", ready(f"{prom_url}/-/ready"), 60, logs)
        wait_for("convnext-serve /readyz", ready(f"{serve_url}/readyz"), READY_TIMEOUT_S, logs)
        assert send_round(serve_url, 0) == [200, 200, 200, 200, 400]

        # Traffic keeps flowing while the queries are checked, so every rate() has increases
        # to see; bounded in time and paced so that it leaves the CPUs to the service.
        def keep_sending():
            deadline = time.monotonic() + READY_TIMEOUT_S
            seed = 1
            while not stop_traffic.is_set() and time.monotonic() < deadline:
                send_round(serve_url, seed)
                seed += 1
                stop_traffic.wait(0.5)

        traffic = threading.Thread(target=keep_sending, daemon=True)
        traffic.start()
        yield Stack(serve_url, prom_url, logs)
    finally:
        stop_traffic.set()
        if traffic is not None:
            traffic.join(90)
        stop(serve, signal.SIGINT, 90)
        stop(prom, signal.SIGTERM, 30)


def test_target_is_up(stack):
    def up():
        return [r for r in stack.query('up{job="convnext-serve"}') if r["value"][1] == "1"]

    (target,) = wait_for("the scrape target to be up", up, DATA_TIMEOUT_S, stack.logs)
    assert target["metric"]["instance"].startswith("127.0.0.1:")


def test_every_design_metric_has_samples(stack):
    for name, labels in DOCUMENTED_METRICS.items():
        selector = name + "{" + ",".join(f'{label}!=""' for label in labels) + "}"
        wait_for(
            f"samples of {selector}", lambda s=selector: stack.query(s), DATA_TIMEOUT_S, stack.logs
        )
    # The served models, as the info metric tells them.
    info = stack.query("ray_convnext_serve_model_info")
    assert {r["metric"]["task"] for r in info} == {"classify", "detect", "segment"}
    assert {r["metric"]["device"] for r in info} == {"cpu"}


def test_every_dashboard_query_returns_data(stack):
    gpu = bool(stack.query("ray_node_gpus_available"))
    unchecked = []
    for title, expr in dashboard_queries():
        promql = expr.replace("$__rate_interval", RATE_WINDOW)
        if not gpu and promql_metric_names(promql) <= GPU_METRICS:
            unchecked.append(title)  # GPU panels have data only where a GPU is
            stack.query(promql)  # still valid PromQL
            continue
        wait_for(
            f"data for panel {title!r}: {promql}",
            lambda q=promql: stack.has_data(q),
            DATA_TIMEOUT_S,
            stack.logs,
        )
    assert len(unchecked) <= 2, f"only the GPU panels may go unchecked: {unchecked}"
