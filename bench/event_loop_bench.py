"""The CPU a request costs the server replica's own code, in-process, without Ray or uvicorn.

A server replica (`service.app.Server`, constructed as Serve constructs it) serves a random
`convnext_atto` 64² in this process; classify requests of 640x480 JPEGs (multipart, or a raw
body) go straight into the ASGI app (`service.routes.api`), their bodies in 64 KB chunks as
uvicorn hands them over, `--concurrency` at a time. It prints the event loop's CPU a request
(the guard, the body and multipart parse, the batcher, the answer) and the inference thread's
CPU an image (decode, preprocess, model), each thread's own CPU time: the figures to compare
before and after a change to the hot path, free of the VM's noise in a whole-service run.

    .venv/bin/python bench/event_loop_bench.py [--images-per-request 1 8] [--raw-body]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import make_checkpoint, make_photos, request_of

CHUNK = 65536  # what uvicorn's protocol hands the app at a time


def thread_cpu_s(native_id: int) -> float:
    """A thread of this process's CPU time (user + system)."""
    thread = next(t for t in psutil.Process().threads() if t.id == native_id)
    return thread.user_time + thread.system_time


async def build_server(checkpoint: Path, max_batch_size: int):
    """The HTTP app of a server replica as Serve builds it (its ingress wrapper's `__init__` is
    async)."""
    from service.app import Server

    cls = Server.func_or_class
    server = cls.__new__(cls)
    model = {
        "name": "atto",
        "checkpoint": str(checkpoint),
        "max_batch_size": max_batch_size,
        "torch_threads": 1,
        "max_queued_requests": -1,
    }
    await cls.__init__(server, server={})
    server.reconfigure({"models": [model]})  # as Serve does before the replica takes requests
    for host in server.plane.models.hosts():
        await asyncio.wrap_future(host.warm)
    return server.__serve_build_asgi_app__()  # the replica's HTTP app, as Serve builds it


async def one_request(api, path: str, body: bytes, headers: dict[str, str]) -> None:
    route, _, query = path.partition("?")
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw_headers += [(b"content-length", str(len(body)).encode()), (b"host", b"bench")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw_headers,
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
    }
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]

    async def receive() -> dict:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await api(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"the bench request was answered {sent[0]['status']}: {sent[1:]}")


async def run_requests(api, request: tuple[str, bytes, dict], count: int, concurrency: int):
    """`count` copies of `request`, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def gated() -> None:
        async with gate:
            await one_request(api, *request)

    await asyncio.gather(*(gated() for _ in range(count)))


async def measure(args) -> list[tuple[int, float, float, float]]:
    """(images a request, event-loop CPU ms a request, inference CPU ms an image, requests/s)
    for each level, the median of `--repeats` runs."""
    from service.runtime import INFERENCE_THREAD

    folder = Path(tempfile.mkdtemp(prefix="event-loop-bench-"))
    checkpoint = make_checkpoint(folder, "convnext_atto", 64)
    api = await build_server(checkpoint, args.max_batch_size)
    inference_id = INFERENCE_THREAD.submit(threading.get_native_id).result()
    photos = make_photos()
    kind = "raw" if args.raw_body else "multipart"
    rows = []
    for n in args.images_per_request:
        request = request_of(kind, photos, n)
        await run_requests(api, request, 2 * args.concurrency, args.concurrency)  # warm-up
        runs = []
        for _ in range(args.repeats):
            loop_s, infer_s = time.thread_time(), thread_cpu_s(inference_id)
            started = time.perf_counter()
            await run_requests(api, request, args.requests, args.concurrency)
            elapsed = time.perf_counter() - started
            loop_s, infer_s = time.thread_time() - loop_s, thread_cpu_s(inference_id) - infer_s
            runs.append(
                (
                    1e3 * loop_s / args.requests,
                    1e3 * infer_s / (args.requests * n),
                    args.requests / elapsed,
                )
            )
        rows.append((n, *(statistics.median(r[i] for r in runs) for i in range(3))))
        print(f"{n} a request: {runs}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--raw-body", action="store_true", help="an image/jpeg body, one image")
    parser.add_argument("--requests", type=int, default=1000, help="a run")
    parser.add_argument("--repeats", type=int, default=5, help="runs a level (median)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.raw_body and args.images_per_request != [1]:
        parser.error("--raw-body takes one image a request")
    rows = asyncio.run(measure(args))
    print()
    print(
        f"convnext_atto 64x64, 640x480 JPEGs, {'raw' if args.raw_body else 'multipart'} "
        f"bodies, {args.concurrency} requests in flight, median of {args.repeats} runs of "
        f"{args.requests}; each thread's own CPU time"
    )
    print()
    print(
        "| images a request | event loop CPU ms a request | inference CPU ms an image "
        "| requests/s |"
    )
    print("|---:|---:|---:|---:|")
    for n, loop_ms, infer_ms, rate in rows:
        print(f"| {n} | {loop_ms:.3f} | {infer_ms:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
