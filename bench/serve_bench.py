"""Serving benchmark: the model in-process, the service over HTTP, and a naive server.

Same machine, same model (`convnext_tiny`, 224x224, 1000 classes, random weights) and precision,
JPEG photos of 640x480 as the input:

  (a) raw model images/s in-process at its best batch size (uint8 batch in, logits out);
  (b) the service (`convnext-serve run`) over HTTP at concurrency 1, 8 and 32: images/s,
      p50/p95/p99 latency, the mean batch size from the service's own metrics, and the CPU
      time each part of the service spends per image;
  (c) a naive baseline: plain FastAPI + uvicorn, one forward pass per request;
  (d) the bound: what a server with zero overhead would reach here, cores / (one thread's CPU
      time per image to decode and preprocess the same JPEG as the service does + one thread's
      CPU time per image to run the model at its best batch), measured before and after the
      service's rows, each part's least time of the two.

    .venv/bin/python bench/serve_bench.py [--precision fp32] [--seconds 20]
    # the service's own cost, with a model too cheap to matter (what bounds it on a GPU):
    .venv/bin/python bench/serve_bench.py --arch convnext_atto --image-size 64 --skip-naive
    # a pipeline in the replica against the client's round trip (bench/pipeline_bench.py):
    .venv/bin/python bench/serve_bench.py --pipeline [--demo-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import LOGGING_CONFIG  # noqa: E402
from tests.ports import free_port  # noqa: E402


def make_checkpoint(folder: Path, arch: str = "convnext_tiny", image_size: int = 224) -> Path:
    import torch

    from models import build_model, save_checkpoint
    from models.checkpoint import CheckpointMeta, Provenance
    from models.labels import imagenet1k_labels

    torch.manual_seed(0)
    model = build_model(arch)
    meta = CheckpointMeta(
        task="classify",
        arch=arch,
        head="linear",
        num_classes=1000,
        image_size=image_size,
        labels=imagenet1k_labels(),
        provenance=Provenance(source="converted", dataset="bench"),
    )
    return save_checkpoint(model, folder / f"{arch}.safetensors", meta)


def make_photos(n: int = 16) -> list[bytes]:
    """640x480 JPEGs with photo-like content (smooth gradients plus detail)."""
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(n):
        base = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize((640, 480), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.float32) + rng.normal(0, 12, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    return photos


def raw_model(
    checkpoint: Path, precision: str, seconds: float, batches: list[int], compile: bool = False
) -> tuple[dict, float]:
    """(a): {batch: images/s}, and the batch-1 latency in ms."""

    from service.config import ModelConfig
    from service.runtime import ModelRunner

    config = ModelConfig(
        name="raw", checkpoint=str(checkpoint), precision=precision, compile=compile
    )
    runner = ModelRunner(config)
    size = runner.meta.image_size
    image = np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8)
    results, batch1_ms = {}, 0.0
    for batch in batches:
        for _ in range(2):
            run_prepared(runner, [image] * batch)
        times = []
        deadline = time.perf_counter() + seconds / 5
        while time.perf_counter() < deadline or len(times) < 3:
            start = time.perf_counter()
            run_prepared(runner, [image] * batch)
            times.append(time.perf_counter() - start)
        results[batch] = batch / statistics.median(times)
        if batch == 1:
            batch1_ms = statistics.median(times) * 1e3
    del runner
    return results, batch1_ms


def run_prepared(runner, views: list[np.ndarray]) -> list:
    """The model alone on preprocessed uint8 (3, S, S) views: no decode, no resize."""
    import torch

    from service.runtime import Prepared
    from service.tasks import ClassifyOptions

    images = [torch.from_numpy(v).to(runner.device) for v in views]
    sizes = [tuple(v.shape[-2:]) for v in views]
    prepared = Prepared(images, sizes, [ClassifyOptions(5)] * len(views))
    return runner.submit_forward(prepared).result()


def zero_overhead_bound(
    checkpoint: Path, photos: list[bytes], precision: str, batches: list[int], seconds: float
) -> dict:
    """(d): {"decode_ms", "model_ms", "batch", "images_per_s"}, CPU time of one thread each."""
    import torch

    from models.images import decode_image
    from service.config import ModelConfig, ServerConfig
    from service.runtime import ModelRunner

    config = ModelConfig(
        name="bound", checkpoint=str(checkpoint), precision=precision, torch_threads=1
    )
    runner = ModelRunner(config)
    preset = runner.preset  # the service's preprocessing of this model
    max_pixels = ServerConfig().max_pixels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the resize on this thread too: one thread's time
    try:
        views, start, deadline = [], time.process_time(), time.perf_counter() + seconds / 4
        while time.perf_counter() < deadline or len(views) < 2 * len(photos):
            photo = photos[len(views) % len(photos)]
            decoded = decode_image(photo, max_pixels, preset.min_short_side)
            view = preset(torch.from_numpy(decoded.pixels).permute(2, 0, 1))
            views.append(view.contiguous().numpy())
        decode_ms = (time.process_time() - start) / len(views) * 1e3
    finally:
        torch.set_num_threads(threads)
    model_ms = {}
    for batch in batches:
        batch_views = [views[i % len(views)] for i in range(batch)]
        run_prepared(runner, batch_views)  # warm-up
        count, start, deadline = 0, time.process_time(), time.perf_counter() + seconds / 8
        while time.perf_counter() < deadline or count < 3 * batch:
            run_prepared(runner, batch_views)
            count += batch
        model_ms[batch] = (time.process_time() - start) / count * 1e3
    del runner
    batch = min(model_ms, key=model_ms.get)
    return bound_of(decode_ms, model_ms[batch], batch)


def bound_of(decode_ms: float, model_ms: float, batch: int) -> dict:
    """(d) from one thread's CPU time an image for each part: every core doing both."""
    return {
        "decode_ms": decode_ms,
        "model_ms": model_ms,
        "batch": batch,
        "images_per_s": (os.cpu_count() or 1) * 1e3 / (decode_ms + model_ms),
    }


def fastest_bound(measured: list[dict]) -> dict:
    """(d) from measurements taken before and after the service's rows: each part's least CPU
    time an image, so a VM that slowed down during one measurement does not lower the bound
    and flatter the shares (`measured` kept for the report)."""
    fastest = min(measured, key=lambda b: b["model_ms"])
    decode_ms = min(b["decode_ms"] for b in measured)
    return {**bound_of(decode_ms, fastest["model_ms"], fastest["batch"]), "measured": measured}


def describe_bound(bound: dict) -> str:
    return (
        f"decode and preprocess {bound['decode_ms']:.2f} ms + model {bound['model_ms']:.2f}"
        f" ms at batch {bound['batch']}, one thread each"
    )


async def load(
    url: str, photos: list[bytes], concurrency: int, seconds: float, per_request: int = 1
) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request on each answer;
    a request carries `per_request` photos. Raw figures; `run_load` summarises them."""
    import aiohttp

    latencies: list[float] = []
    errors = 0

    def form_of(i: int) -> aiohttp.FormData:
        form = aiohttp.FormData()
        for j in range(per_request):
            form.add_field(
                "image", photos[(i + j) % len(photos)], filename="p.jpg", content_type="image/jpeg"
            )
        return form

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            form = form_of(i)
            start = time.perf_counter()
            async with session.post(url, data=form) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - start)
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def once() -> None:
            async with session.post(url, data=form_of(0)) as r:
                await r.read()

        await asyncio.gather(*(once() for _ in range(concurrency)))  # warm every connection
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "latencies": latencies,
        "elapsed": elapsed,
        "errors": errors,
        "images": len(latencies) * per_request,
    }


def _load_in_process(args: tuple) -> dict:
    return asyncio.run(load(*args))


WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
for line in string.gmatch(os.getenv("BENCH_HEADERS"), "[^\\n]+") do
  local name, value = string.match(line, "^([^:]+): (.*)$")
  wrk.headers[name] = value
end
"""

# What a request carries: /v1 as a multipart form or a raw image/jpeg body; the Open Inference
# Protocol with the binary tensor extension, JPEGs (BYTES) or pixels the client decoded (UINT8).
BODIES = ("multipart", "raw", "v2-image", "v2-pixels")


def request_of(kind: str, photos: list[bytes], per_request: int) -> tuple[str, bytes, dict]:
    """(path and query, body, headers) of a classify request of `kind` (BODIES)."""
    import json
    import struct
    import uuid

    chosen = [photos[i % len(photos)] for i in range(per_request)]
    if kind == "multipart":
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"'
            f"\r\nContent-Type: image/jpeg\r\n\r\n".encode()
            + photo
            + b"\r\n"
            for photo in chosen
        ]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return (
            "/v1/classify?top_k=5",
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    if kind == "raw":
        return "/v1/classify?top_k=5", chosen[0], {"Content-Type": "image/jpeg"}
    if kind == "v2-image":
        tensor = b"".join(struct.pack("<I", len(photo)) + photo for photo in chosen)
        name, datatype, shape = "image", "BYTES", [len(chosen)]
    else:
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in chosen])
        tensor = pixels.tobytes()
        name, datatype, shape = "pixels", "UINT8", list(pixels.shape)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ],
            "outputs": [
                {"name": n, "parameters": {"binary_data": True}} for n in ("scores", "class_ids")
            ],
            "parameters": {"top_k": 5},
        }
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return "/v2/models/tiny/infer", header + tensor, headers


def run_wrk(
    url: str,
    photos: list[bytes],
    concurrency: int,
    seconds: float,
    per_request: int = 1,
    kind: str = "multipart",
) -> dict:
    """Closed-loop load from wrk (C, one thread: a cheap client that leaves the cores to the
    server) on the service at `url`: every request the same, a classify request of `kind`
    (BODIES) with `per_request` photos."""
    import re
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="wrk-"))
    path, body, headers = request_of(kind, photos, per_request)
    (folder / "body").write_bytes(body)
    (folder / "post.lua").write_text(WRK_SCRIPT)
    env = {
        **os.environ,
        "BENCH_BODY": str(folder / "body"),
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers.items()),
    }
    url = url + path
    # wrk gives up on a request after 2 s by default and leaves it out of the latencies; a
    # slow model at high concurrency answers later than that
    cmd = [
        shutil.which("wrk") or "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        "--timeout",
        "120s",
        "--latency",
        "-s",
        str(folder / "post.lua"),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def latency(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * units[m.group(2)] if m else float("nan")

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = int(errors.group(1)) if errors else 0
    socket_errors = re.search(r"Socket errors: (.*)", out)  # connect, read, write, timeout
    if socket_errors:
        failed += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return {
        "images_per_s": rps * per_request,
        "p50": latency(50),
        "p95": float("nan"),
        "p99": latency(99),
        "errors": failed,
    }


def run_load(
    url: str,
    photos: list[bytes],
    concurrency: int,
    seconds: float,
    per_request: int = 1,
    processes: int = 1,
) -> dict:
    """`load` split over `processes` client processes (one Python process cannot send the
    thousands of requests a second a GPU service takes); images/s and latency percentiles."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    if processes == 1:
        parts = [asyncio.run(load(url, photos, concurrency, seconds, per_request))]
    else:
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(url, photos, share, seconds, per_request) for share in shares]
        with ProcessPoolExecutor(processes) as pool:
            parts = list(pool.map(_load_in_process, jobs))
    lat = sorted(x for part in parts for x in part["latencies"])
    elapsed = max(part["elapsed"] for part in parts)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")

    return {
        "images_per_s": sum(part["images"] for part in parts) / elapsed,
        "p50": pct(0.5),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "errors": sum(part["errors"] for part in parts),
    }


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def scrape(metrics_url: str) -> dict[str, float]:
    """Totals of the service's images and batches counters (the mean batch is their ratio:
    Ray exports a histogram's sum from bucket midpoints, so the batch-size sum is not exact)."""
    import requests

    totals = {"images": 0.0, "batches": 0.0}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_convnext_serve_images_total{"):
            totals["images"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_convnext_serve_batch_size_count{"):
            totals["batches"] += float(line.rsplit(" ", 1)[1])
    return totals


PROCESS_GROUPS = (
    ("server", "ServeReplica:bench:server"),
    ("proxy", "ProxyActor"),
    ("proxy", "haproxy"),
    ("proxy", "HAProxy"),
)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the service's processes, by role (the rest of Ray: 'ray')."""
    import psutil

    totals = {"server": 0.0, "proxy": 0.0, "ray": 0.0}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        times = p.info["cpu_times"]
        if times is None or ("ray" not in cmdline):
            continue
        role = next((r for r, key in PROCESS_GROUPS if key in cmdline), "ray")
        totals[role] += times.user + times.system
    return totals


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def floor_levels(photos: list[bytes], args, replicas: int) -> list[tuple[int, int, dict]]:
    """(e) the floor: `bench.floor_app` (Ray Serve's front end answering at once, with the
    service's replica count) at each level; (images a request, concurrency, result), the result
    with the CPU a request takes (`cpu_ms`: the whole machine's busy time, the server's and
    HAProxy's) and the cores the rest of Ray keeps busy (`ray_cores`: its controller, agents
    and GCS take about as much whatever the load, so it is a share of the machine, not a cost
    a request)."""
    import psutil

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.floor_app",
        "--port",
        str(port),
        "--replicas",
        str(replicas),
    ]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    kind = "raw" if args.raw_body else "multipart"
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, args.ready_timeout_s)
        for n, c in itertools.product(args.images_per_request, args.concurrency):
            machine, roles, started = psutil.cpu_times(), cpu_seconds(), time.perf_counter()
            result = run_wrk(f"http://127.0.0.1:{port}", photos, c, args.seconds, n, kind)
            after, roles_after = psutil.cpu_times(), cpu_seconds()
            elapsed = time.perf_counter() - started
            busy = sum(after) - sum(machine) - (after.idle - machine.idle)
            busy -= after.iowait - machine.iowait
            used = {k: roles_after[k] - roles[k] for k in roles}
            requests = max(1.0, result["images_per_s"] * args.seconds / n)
            result["cpu_ms"] = {
                "all but Ray": 1e3 * (busy - used["ray"]) / requests,
                "server": 1e3 * used["server"] / requests,
                "HAProxy": 1e3 * used["proxy"] / requests,
            }
            result["ray_cores"] = used["ray"] / elapsed
            rows.append((n, c, result))
            print(f"(e) floor {n} a request c={c}: {result}", flush=True)
    finally:
        stop(proc)
        log.close()
    return rows


def serve_levels(
    checkpoint: Path, folder: Path, photos: list[bytes], args, layout: dict, label: str
) -> list[tuple[str, int, dict]]:
    """(b) for one replica layout: start `convnext-serve run`, load it at each concurrency.

    `layout` holds model settings, and the server's under "server" (optional)."""
    port, metrics_port = free_port(), free_port()
    layout = dict(layout)
    limits = layout.pop("server", {})
    model = {
        "name": "tiny",
        "checkpoint": str(checkpoint),
        "precision": args.precision,
        "max_batch_size": args.max_batch_size,
        "max_queued_requests": -1,
        "compile": args.compile,
        **layout,
    }
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "bench",
                "route_prefix": "/",
                "import_path": "service.app:build_app",
                "logging_config": LOGGING_CONFIG,  # as shipped
                "args": {"models": [model], "server": limits},
            }
        ],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "--config",
        str(folder / "config.yaml"),
        "--metrics-port",
        str(metrics_port),
    ]
    # Ray exports metrics every 10 s unless told otherwise: the waits around a level follow it
    env, export_s = dict(os.environ), 10.0
    if args.metrics_interval_s:
        export_s = max(1.0, args.metrics_interval_s)
        env["RAY_metrics_report_interval_ms"] = str(int(export_s * 1000))
    logs = Path(args.log_dir) if args.log_dir else folder
    logs.mkdir(parents=True, exist_ok=True)
    log_name = "service-" + "".join(ch if ch.isalnum() else "-" for ch in label) + ".log"
    log = open(logs / log_name, "wb")  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, args.ready_timeout_s)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        url = f"http://127.0.0.1:{port}"
        kinds = ["raw" if args.raw_body else "multipart"]
        if args.protocol == "v2":
            kinds += ["v2-image", "v2-pixels"]
        levels = itertools.product(args.images_per_request, args.concurrency, kinds)
        for n, c, kind in levels:
            time.sleep(0.6 * export_s)  # the last level's counts exported
            before, cpu_before = scrape(metrics_url), cpu_seconds()
            if args.client == "wrk":
                result = run_wrk(url, photos, c, args.seconds, n, kind)
            else:
                result = run_load(
                    url + "/v1/classify?top_k=5", photos, c, args.seconds, n, args.client_processes
                )
            cpu_after = cpu_seconds()
            time.sleep(1.2 * export_s)
            after = scrape(metrics_url)
            batches = after["batches"] - before["batches"]
            result["mean_batch"] = (after["images"] - before["images"]) / batches if batches else 0
            images = max(1.0, after["images"] - before["images"])
            result["cpu_ms"] = {k: 1e3 * (cpu_after[k] - cpu_before[k]) / images for k in cpu_after}
            result["per_request"] = n
            name = f"service, {label}" + ("" if kind in ("multipart", "raw") else f", {kind}")
            rows.append((name, c, result))
            print(f"(b) {name} c={c}: {result}", flush=True)
    finally:
        stop(proc)
        log.close()
    return rows


# --gpu-decode: the decode layouts each GPU replica count runs
GPU_DECODES = {"both": ("GPU", "CPU"), "gpu": ("GPU",), "cpu": ("CPU",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--seconds", type=float, default=20, help="per load level")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="clients in flight (default: 1 8 32, and 256 on a GPU)",
    )
    parser.add_argument(
        "--images-per-request",
        type=int,
        nargs="+",
        default=[1],
        help="photos a request carries; several values are levels on the same running service",
    )
    parser.add_argument(
        "--metrics-interval-s",
        type=float,
        default=0,
        help="Ray's metrics export period for the service (default Ray's 10 s); the waits "
        "around each level follow it, so 1 s makes a run shorter",
    )
    parser.add_argument(
        "--gpu-decode",
        choices=list(GPU_DECODES),
        default="both",
        help="on a GPU, the layouts to run: GPU (nvJPEG) decode, CPU (Pillow) decode, or both",
    )
    parser.add_argument(
        "--raw-body",
        action="store_true",
        help="send the photo as a raw image/jpeg body, not a multipart form (wrk, one image "
        "a request)",
    )
    parser.add_argument(
        "--client",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator: wrk (C, cheap; Debian's wrk) or Python aiohttp processes",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=0,
        help="load-generator processes (default: 1 on a CPU node, a quarter of the cores on "
        "a GPU node)",
    )
    parser.add_argument(
        "--arch",
        default="convnext_tiny",
        help="e.g. convnext_atto with --image-size 64: a model so cheap that the service's "
        "own CPU cost per image decides the images/s, as on a GPU",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        help="the service's batch size (default: the raw model's best)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="raw batch sizes to try (default: 1 2 4 8 on CPU, up to 256 on a GPU)",
    )
    parser.add_argument(
        "--gpu-replicas",
        type=int,
        nargs="+",
        default=[2, 4],
        help="server replicas sharing the GPU: each replica's Python handles every request it "
        "gets, so several spread that work over cores",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--ready-timeout-s",
        type=float,
        default=600,
        help="give up on a replica layout whose service is not ready by then, and go on",
    )
    parser.add_argument("--log-dir", help="where the services' logs go (default: a temp folder)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--protocol",
        choices=["v1", "v2"],
        default="v1",
        help="v2: also the Open Inference Protocol (binary tensors: the JPEGs as BYTES, and "
        "pixels the client decoded as UINT8) beside /v1 at each level (wrk)",
    )
    parser.add_argument("--raw-only", action="store_true", help="(a) only: the raw model")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="instead: the demo pipeline in the replica against the client's round trip "
        "(detect, crop, classify each) at 1 and 8 objects an image (`bench/pipeline_bench.py`)",
    )
    parser.add_argument(
        "--demo-dir", help="--pipeline: the demo models' folder (default: the service's)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="(e): the same load on Ray Serve's front end answering at once "
        "(`bench.floor_app`), the least CPU a request takes on this stack, and so the most the "
        "service could reach (on a GPU node, with the first --gpu-replicas)",
    )
    args = parser.parse_args()
    if args.pipeline:
        from bench.pipeline_bench import run

        run(args)
        return
    if args.raw_body and (args.client != "wrk" or args.images_per_request != [1]):
        parser.error("--raw-body takes the wrk client and one image a request")
    if args.protocol == "v2" and args.client != "wrk":
        parser.error("--protocol v2 takes the wrk client")

    import torch

    gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    args.concurrency = args.concurrency or ([1, 8, 32, 256] if gpu else [1, 8, 32])
    args.client_processes = args.client_processes or (max(1, cores // 4) if gpu else 1)
    batches = args.batches or ([1, 8, 32, 64, 128, 256] if gpu else [1, 2, 4, 8])
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    checkpoint = make_checkpoint(folder, args.arch, args.image_size)
    photos = make_photos()
    raw, batch1_ms = raw_model(checkpoint, args.precision, args.seconds, batches, args.compile)
    best_batch = max(raw, key=raw.get)
    args.max_batch_size = args.max_batch_size or best_batch
    print(
        f"(a) raw model, {args.precision}{' + compile' if args.compile else ''}: "
        + ", ".join(f"b{b} {v:.1f}/s" for b, v in raw.items())
        + f"; batch-1 latency {batch1_ms:.1f} ms",
        flush=True,
    )
    if args.raw_only:
        return

    bound = None
    if not gpu:  # a GPU node's bound is the GPU's, not its cores'
        bound = zero_overhead_bound(checkpoint, photos, args.precision, batches, args.seconds)
        print(
            f"(d) the bound, before the service: {cores} cores / ({describe_bound(bound)}) = "
            f"{bound['images_per_s']:.1f} images/s",
            flush=True,
        )
    floor = []
    if args.floor:  # one replica a core on a CPU node, as many as the GPU layouts' first
        floor = floor_levels(photos, args, args.gpu_replicas[0] if gpu else cores)

    # Replica layouts: on a CPU node one replica with every core (lowest latency) and one
    # single-threaded replica per core (most images/s); on a GPU, model replicas sharing it.
    if gpu:  # server replicas sharing the GPU (each one's Python serves its share), GPU/CPU decode
        layouts = {}
        for r in args.gpu_replicas:
            for decode in GPU_DECODES[args.gpu_decode]:
                layouts[f"{r} replicas on the GPU, {decode} decode"] = {
                    "num_replicas": r,
                    "num_gpus": round(1 / r, 3),
                    "gpu_decode": decode == "GPU",
                }
    else:
        layouts = {
            f"1 replica x {cores} threads": {"num_replicas": 1, "torch_threads": cores},
            f"{cores} replicas x 1 thread": {"num_replicas": cores, "torch_threads": 1},
        }
    rows = []
    for label, layout in layouts.items():
        try:
            rows += serve_levels(checkpoint, folder, photos, args, layout, label)
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as e:
            print(
                f"(b) {label}: failed ({e!r}); its log is in {args.log_dir or folder}", flush=True
            )

    if bound:  # again after the service's rows: the VM's speed drifts within a run
        after = zero_overhead_bound(checkpoint, photos, args.precision, batches, args.seconds)
        print(
            f"(d) the bound, after the service: {describe_bound(after)} = "
            f"{after['images_per_s']:.1f} images/s",
            flush=True,
        )
        bound = fastest_bound([bound, after])

    if not args.skip_naive:
        port = free_port()
        env = {**os.environ, "BENCH_CHECKPOINT": str(checkpoint), "BENCH_PRECISION": args.precision}
        naive = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.naive_server:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", naive)
            url = f"http://127.0.0.1:{port}"
            # the same load generator as the service's rows
            for n, c in itertools.product(args.images_per_request, args.concurrency):
                if args.client == "wrk":
                    result = run_wrk(url, photos, c, args.seconds, n)
                else:
                    result = run_load(
                        url + "/v1/classify", photos, c, args.seconds, n, args.client_processes
                    )
                result["mean_batch"] = float(n)
                result["per_request"] = n
                rows.append(("naive FastAPI", c, result))
                print(f"(c) naive c={c}: {result}", flush=True)
        finally:
            stop(naive)

    best = raw[best_batch]
    device = torch.cuda.get_device_name() if gpu else f"{cores}-core CPU"
    print()
    body = "a raw body" if args.raw_body else "multipart requests"
    print(
        f"{device}, {args.arch} {args.image_size}x{args.image_size} {args.precision}, JPEG "
        f"640x480 in, {body}, {args.client} client; raw model in-process: best "
        f"{best:.1f} images/s at batch {best_batch}; "
        f"batch 1: {raw[1]:.1f} images/s, {batch1_ms:.1f} ms; service max_batch_size "
        f"{args.max_batch_size}"
    )
    if bound:
        each = " and ".join(f"{b['images_per_s']:.1f}" for b in bound["measured"])
        print(
            f"bound (d): {bound['images_per_s']:.1f} images/s ({describe_bound(bound)}: the "
            f"least of each measured before and after the service's rows, which alone "
            f"gave {each})"
        )
    print()
    print(
        "| server | images a request | concurrency | images/s | % of raw best | % of bound "
        "| p50 ms | p95 ms | p99 ms | mean batch "
        "| CPU ms per image: server / HAProxy / rest of Ray | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, c, r in rows:
        cpu = r.get("cpu_ms")  # server, proxy, ray: cpu_seconds()'s order
        cpu_text = " / ".join(f"{v:.1f}" for v in cpu.values()) if cpu else "-"
        of_bound = f"{100 * r['images_per_s'] / bound['images_per_s']:.0f}%" if bound else "-"
        print(
            f"| {name} | {r['per_request']} | {c} | {r['images_per_s']:.1f} "
            f"| {100 * r['images_per_s'] / best:.0f}% "
            f"| {of_bound} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} "
            f"| {r['mean_batch']:.1f} | {cpu_text} | {r['errors']} |"
        )
    if floor:
        print_floor(floor, bound, cores)


def print_floor(floor: list[tuple[int, int, dict]], bound: dict | None, cores: int) -> None:
    """(e) and what it allows: the front end's most images/s, (cores - the rest of Ray's) /
    (the floor's CPU a request / images a request); on a CPU node also the ceiling, (cores -
    the rest of Ray's) / (decode and model of an image + the floor's CPU a request / images a
    request), what the service would reach if its own code cost nothing."""
    print()
    print(
        "(e) the floor: Ray Serve's front end answering at once (`bench.floor_app`), the same load"
    )
    print()
    print(
        "| images a request | concurrency | requests/s "
        "| CPU ms a request: all but Ray / server / HAProxy | rest of Ray, cores "
        "| front end's most images/s | ceiling images/s | ceiling % of bound |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for n, c, r in floor:
        cpu = r["cpu_ms"]
        cores_left = cores - r["ray_cores"]
        front_end = cores_left * 1e3 * n / cpu["all but Ray"]
        ceiling = share = "-"
        if bound:
            per_image_ms = bound["decode_ms"] + bound["model_ms"] + cpu["all but Ray"] / n
            most = cores_left * 1e3 / per_image_ms
            ceiling, share = f"{most:.1f}", f"{100 * most / bound['images_per_s']:.0f}%"
        print(
            f"| {n} | {c} | {r['images_per_s'] / n:.0f} | "
            + " / ".join(f"{v:.2f}" for v in cpu.values())
            + f" | {r['ray_cores']:.2f} | {front_end:.0f} | {ceiling} | {share} |"
        )


if __name__ == "__main__":
    main()
