"""A pipeline in the replica against the client's round trip (`serve_bench.py --pipeline`).

The demo detector and classifier, served by `convnext-serve run` with the demo pipeline
(`shapes-inside-boxes`: each box the detector finds, classified). Scenes of 640x480 drawn
with 1 and with 8 shapes (JPEG), under closed-loop load from Python clients, three ways:

  pipeline:           one request, POST /v1/pipelines/shapes-inside-boxes;
  round trip, each:   POST /v1/detect, then the client decodes the image, cuts each box with
                      the pipeline's margin, encodes each crop (PNG) and posts each one to
                      /v1/classify, all at once (what a client without pipelines does);
  round trip, one:    the same, all of an image's crops in one /v1/classify request.

Images/s, p50/p99 latency of a whole image's answer, the boxes a scene gave, and the client's
own CPU time per image (it shares the machine with the service).

    .venv/bin/python bench/serve_bench.py --pipeline [--demo-dir DIR] [--seconds 20]
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.demo import demo_checkpoint, demo_dir  # noqa: E402
from service.config import DEMO_PIPELINE, PipelineConfig, app_serve_config  # noqa: E402
from service.pipelines import crop_rect  # noqa: E402
from tests.ports import free_port  # noqa: E402

WAYS = ("pipeline", "round trip, each", "round trip, one")
KINDS = ("circle", "square", "triangle", "star")


def scene(rng: np.random.Generator, count: int, size=(640, 480)) -> bytes:
    """A JPEG of `count` flat shapes apart from each other on a grey noisy ground."""
    width, height = size
    ground = 120 + rng.normal(0, 8, (height, width, 1)) * np.ones(3)
    image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
    draw, placed = ImageDraw.Draw(image), []
    while len(placed) < count:
        r = rng.uniform(45, 70)
        cx, cy = rng.uniform(r + 4, width - r - 4), rng.uniform(r + 4, height - r - 4)
        if any(np.hypot(cx - x, cy - y) < r + q + 10 for x, y, q in placed):
            continue
        placed.append((cx, cy, r))
        colour = tuple(int(c) for c in rng.choice([20, 60, 200, 240], 3))
        kind = KINDS[len(placed) % len(KINDS)]
        if kind == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            corners = 3 if kind == "triangle" else 10
            radii = [r if kind == "triangle" or k % 2 == 0 else 0.45 * r for k in range(corners)]
            angles = [-np.pi / 2 + 2 * np.pi * k / corners for k in range(corners)]
            points = [
                (cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)
            ]
            draw.polygon(points, fill=colour)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def client_crops(data: bytes, detections: list[dict], margin: float) -> list[bytes]:
    """What a client without pipelines does with /v1/detect's answer: decode the image, cut
    each box with the margin, encode each crop."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    height, width = pixels.shape[:2]
    crops = []
    for d in detections:
        rect = crop_rect(d["box"], width, height, margin)
        if rect is None:
            continue
        left, top, right, bottom = rect
        out = io.BytesIO()
        Image.fromarray(pixels[top:bottom, left:right]).save(out, "PNG")
        crops.append(out.getvalue())
    return crops


async def load(url: str, images: list[bytes], way: str, concurrency: int, seconds: float) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next image on each answer."""
    import aiohttp

    pipeline = PipelineConfig(**DEMO_PIPELINE)
    latencies: list[float] = []
    boxes: list[int] = []
    errors = 0

    def form(*datas: bytes) -> aiohttp.FormData:
        f = aiohttp.FormData()
        for data in datas:
            f.add_field("image", data, filename="i.png", content_type="image/png")
        return f

    async def post(session, path: str, *datas: bytes) -> dict:
        async with session.post(url + path, data=form(*datas)) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"{r.status}: {body}")
            return body

    async def one(session, data: bytes) -> int:
        if way == "pipeline":
            answer = await post(session, f"/v1/pipelines/{pipeline.name}", data)
            return len(answer["results"][0]["detections"])
        params = f"?score_threshold={pipeline.score_threshold}&masks=false"
        found = await post(session, "/v1/detect" + params, data)
        crops = client_crops(data, found["results"][0]["detections"], pipeline.margin)
        classify = "/v1/classify?top_k=3&model=" + pipeline.steps[0].model
        if crops and way == "round trip, one":
            await post(session, classify, *crops)
        elif crops:
            await asyncio.gather(*(post(session, classify, crop) for crop in crops))
        return len(crops)

    async def client(k: int, session) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                n = await one(session, images[i % len(images)])
            except RuntimeError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            boxes.append(n)
            i += concurrency

    connector = aiohttp.TCPConnector(limit=8 * concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, images[k % len(images)]) for k in range(concurrency)))
        cpu, started = time.process_time(), time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")

    return {
        "images_per_s": len(lat) / elapsed,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "boxes": float(np.mean(boxes)) if boxes else 0.0,
        "client_cpu_ms": 1e3 * cpu / max(1, len(lat)),
        "errors": errors,
    }


def config(folder: Path, port: int) -> Path:
    """The demo detector and classifier with the demo pipeline, as `make run` serves them."""
    models = [
        {"name": DEMO_PIPELINE["detector"], "checkpoint": str(demo_checkpoint("detect", folder))},
        {
            "name": DEMO_PIPELINE["steps"][0]["model"],
            "checkpoint": str(demo_checkpoint("classify", folder)),
            "max_batch_size": 32,
        },
    ]
    serve = app_serve_config(models, host="127.0.0.1", port=port)
    serve["applications"][0]["args"]["pipelines"] = [DEMO_PIPELINE]
    path = Path(tempfile.mkdtemp(prefix="pipeline-bench-")) / "config.yaml"
    path.write_text(yaml.safe_dump(serve))
    return path


def run(args) -> None:
    """Start the service, load it each way at each object count and concurrency, print the
    table; the service stops at the end."""
    from bench.serve_bench import stop, wait_http

    folder = Path(args.demo_dir) if args.demo_dir else demo_dir()
    for task in ("detect", "classify"):
        if not demo_checkpoint(task, folder).is_file():
            sys.exit(f"no demo {task} model in {folder}: `make demo-models` trains them")
    rng = np.random.default_rng(0)
    scenes = {n: [scene(rng, n) for _ in range(8)] for n in (1, 8)}
    port = free_port()
    logs = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="pipeline-"))
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / "service-pipeline.log", "wb")  # noqa: SIM115 (the server's lifetime)
    cmd = [sys.executable, "-m", "service.cli", "run", "--config", str(config(folder, port))]
    cmd += ["--metrics-port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, args.ready_timeout_s)
        url = f"http://127.0.0.1:{port}"
        for objects, concurrency, way in (
            (n, c, w) for n in scenes for c in args.concurrency or [1, 8] for w in WAYS
        ):
            result = asyncio.run(load(url, scenes[objects], way, concurrency, args.seconds))
            rows.append((objects, concurrency, way, result))
            print(f"{objects} object(s), c={concurrency}, {way}: {result}", flush=True)
    finally:
        stop(proc)
        log.close()
    print_table(rows)


def print_table(rows: list[tuple[int, int, str, dict]]) -> None:
    print(
        "\n| objects an image | clients | way | images/s | vs round trip, each | p50 ms | "
        "p99 ms | boxes an image | client CPU ms an image | errors |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {(n, c): r["images_per_s"] for n, c, w, r in rows if w == "round trip, each"}
    for n, c, way, r in rows:
        ratio = r["images_per_s"] / base[(n, c)] if base.get((n, c)) else float("nan")
        print(
            f"| {n} | {c} | {way} | {r['images_per_s']:.1f} | {ratio:.2f}x | {r['p50']:.0f} | "
            f"{r['p99']:.0f} | {r['boxes']:.1f} | {r['client_cpu_ms']:.1f} | {r['errors']} |"
        )
