"""Faults, measured: the load the service holds at ten times its capacity, a replica killed
under load, and SIGTERM with requests in flight. One table a person can read.

    .venv/bin/python bench/faults.py [--seconds 10]

The service is `convnext-serve run` with a random-init `convnext_atto` at 64x64 (what is
measured is the serving, not the model), two server replicas, each model queue holding
`max_ongoing_requests` 8 + `max_queued_requests` 8 requests, one torch thread each. The
overload comes from wrk (closed loop, ten times the queues' capacity in connections) while
a Python probe sends one request every 50 ms and times each answer; the replica kill and the
drain use Python clients.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ROOT, free_port, make_checkpoint, make_photos, stop, wait_http

from tests.live_service import closed_loop

CAPACITY = 2 * (8 + 8)  # two replicas, each queue 8 in flight + 8 waiting
WRK_COUNTING = """
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/jpeg"
ok, refused, other = 0, 0, 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 503 then refused = refused + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do a = a + t:get("ok"); b = b + t:get("refused");
    c = c + t:get("other") end
  io.write(string.format("COUNTS %d %d %d %d\\n", a, b, c, summary.errors.connect +
    summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def start(
    folder: Path, checkpoint: Path, replicas: int = 2, queued: int = 8
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = {
        "name": "tiny",
        "checkpoint": str(checkpoint),
        "max_batch_size": 8,
        "max_ongoing_requests": 8,
        "max_queued_requests": queued,
        "torch_threads": 1,
    }
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "faults",
                "route_prefix": "/",
                "import_path": "service.app:build_app",
                "args": {"models": [model], "server": {"num_replicas": replicas}},
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
        str(free_port()),
        "--num-cpus",
        "8",
    ]
    log = open(folder / "service.log", "ab")  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", proc)
    return proc, url


def replicas(proc: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "ServeReplica:faults:server" in " ".join(p.cmdline())
    ]


def clients(
    url: str, photo: bytes, n: int, seconds: float, pause_s: float = 0.0, side=None
) -> list[tuple[float, object, float]]:
    """`n` closed-loop clients posting `photo`: (start, status or error, latency) of each."""
    results = closed_loop(url + "/v1/classify", photo, n, seconds, side=side, pause_s=pause_s)
    return [(t, status, latency) for t, status, latency, _ in results]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def overload(url: str, proc, photo: bytes, seconds: float, folder: Path) -> list[tuple]:
    body = folder / "photo.jpg"
    body.write_bytes(photo)
    (folder / "count.lua").write_text(WRK_COUNTING)
    rss = lambda: sum(p.memory_info().rss for p in replicas(proc)) / 2**20  # noqa: E731
    calm = clients(url, photo, 8, seconds)
    calm_ok = sum(1 for _, s, _ in calm if s == 200) / seconds
    before = rss()
    wrk = subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{10 * CAPACITY}",
            f"-d{seconds:g}s",
            "--timeout",
            "60s",
            "-s",
            str(folder / "count.lua"),
            url + "/v1/classify",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "BENCH_BODY": str(body)},
    )
    time.sleep(1)
    probe = clients(url, photo, 1, seconds - 2, pause_s=0.05)
    out = wrk.communicate()[0]
    ok, refused, other, socket_errors = map(int, out.split("COUNTS")[1].split())
    after = rss()
    t = time.monotonic()  # the queues still hold what the burst got in: answered, then free
    while (
        requests.post(
            url + "/v1/classify", data=photo, timeout=60, headers={"Content-Type": "image/jpeg"}
        ).status_code
        != 200
    ):
        time.sleep(0.01)
    first = time.monotonic() - t
    refusals = [lat for _, s, lat in probe if s == 503]
    answers = [lat for _, s, lat in probe if s == 200]
    return [
        ("calm: 8 clients, answered/s", f"{calm_ok:.0f}"),
        (f"burst: {10 * CAPACITY} connections (10x capacity), answered/s", f"{ok / seconds:.0f}"),
        ("burst: refused (503)/s", f"{refused / seconds:.0f}"),
        ("burst: other statuses, socket errors", f"{other}, {socket_errors}"),
        (
            "probe during the burst: 503 latency p50 / p99 (ms)",
            f"{1e3 * pct(refusals, 50):.0f} / {1e3 * pct(refusals, 99):.0f}",
        ),
        (
            "probe during the burst: 200 latency p50 / p99 (ms)",
            f"{1e3 * pct(answers, 50):.0f} / {1e3 * pct(answers, 99):.0f} ({len(answers)} of "
            f"{len(probe)})",
        ),
        ("replica memory before / after (MiB)", f"{before:.0f} / {after:.0f}"),
        ("after the burst: first 200 answer within (ms)", f"{1e3 * first:.0f}"),
    ]


def kill_one(url: str, proc, photo: bytes) -> list[tuple]:
    victim = replicas(proc)[0]
    killed: list[float] = []

    def kill() -> None:
        killed.append(time.monotonic())
        victim.send_signal(signal.SIGKILL)

    started = time.monotonic()
    results = clients(url, photo, 6, 30, side=kill)
    at = killed[0] - started
    failed = [s for _, s, _ in results if s != 200]
    after = sorted(t + lat for t, s, lat in results if s == 200 and t + lat > at)
    longest_gap = float(np.diff([at, *after]).max()) if after else float("inf")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        len(replicas(proc)) < 2 or victim.pid in {p.pid for p in replicas(proc)}
    ):
        time.sleep(0.5)
    replaced = time.monotonic() - killed[0]
    return [
        ("SIGKILL one of 2 replicas, 6 clients for 30 s: requests", f"{len(results)}"),
        (
            "  failed (%), of which 500 / dropped",
            f"{100 * len(failed) / len(results):.2f} ({sum(s == 500 for s in failed)} / "
            f"{sum(isinstance(s, str) for s in failed)})",
        ),
        ("  longest wait for an answer after the kill (s)", f"{longest_gap:.2f}"),
        ("  replacement replica running after (s)", f"{replaced:.1f}"),
    ]


def drain(folder: Path, checkpoint: Path, photo: bytes) -> list[tuple]:
    proc, url = start(folder, checkpoint, replicas=1, queued=64)  # room for every client
    results: list[tuple[float, object, float]] = []
    sent_at: list[float] = []

    def sigterm() -> None:
        sent_at.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)

    thread = threading.Thread(
        target=lambda: results.extend(clients(url, photo, 32, 6, side=sigterm))
    )
    started = time.monotonic()
    thread.start()
    proc.wait(timeout=120)
    exited = time.monotonic()
    thread.join()
    term = sent_at[0] - started
    in_flight = [s for t, s, lat in results if t < term < t + lat]
    later = [s for t, s, _ in results if t > term]
    return [
        (
            "SIGTERM with 32 clients: requests in flight, answered 200",
            f"{len(in_flight)}, {in_flight.count(200)}",
        ),
        (
            "  requests sent after SIGTERM: answered 200, other answers, refused connections",
            f"{later.count(200)}, {sum(isinstance(s, int) and s != 200 for s in later)} "
            f"{sorted({s for s in later if isinstance(s, int) and s != 200})}, "
            f"{sum(isinstance(s, str) for s in later)}",
        ),
        ("  exit after SIGTERM (s)", f"{exited - sent_at[0]:.1f}"),
        ("  exit code", f"{proc.returncode}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="per load phase")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="faults-"))
    checkpoint = make_checkpoint(folder, "convnext_atto", 64)
    photo = make_photos(1)[0]
    rows = []
    proc, url = start(folder, checkpoint)
    try:
        rows += overload(url, proc, photo, args.seconds, folder)
        rows += kill_one(url, proc, photo)
    finally:
        stop(proc)
    rows += drain(folder, checkpoint, photo)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?"
    )
    print(f"\nconvnext-serve under faults ({os.cpu_count()} x {cpu}; convnext_atto 64x64)\n")
    width = max(len(name) for name, _ in rows)
    print(f"| {'what':{width}} | measured |\n|{'-' * (width + 2)}|----------|")
    for name, value in rows:
        print(f"| {name:{width}} | {value} |")


if __name__ == "__main__":
    main()
