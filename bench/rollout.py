"""A full rollout under load: version 1 alone, then version 2 loaded as a canary at 5%, then
50%, then 100%, then version 1 unloaded, each step through the model repository API
(`tritonclient`'s `load_model`), while closed-loop clients keep posting images.

Prints, per phase (each step's own load call included in the phase it starts): images/s, p50
and p99 latency, failed requests, the share version 2 answered, and each replica's peak
memory against the first phase (one version served).

    python bench/rollout.py [--clients 32] [--phase-s 20] [--arch convnext_atto --size 64]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_bench import make_checkpoint
from tests.live_service import AUTH, run_service, server_replicas
from tests.service_models import relabelled

ADMIN_KEY = "bench-admin-key"


def image_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def versions(first: str, second: str, weights: tuple[float, float] | None) -> str:
    """The `config` of a load call: version 1 and 2 at these weights, or version 2 alone."""
    if weights is None:
        listed = [{"version": 2, "checkpoint": second, "weight": 1}]
    else:
        listed = [
            {"version": 1, "checkpoint": first, "weight": weights[0]},
            {"version": 2, "checkpoint": second, "weight": weights[1]},
        ]
    return json.dumps({"versions": listed})


class Traffic:
    """Closed-loop clients posting one image, and a watch on the replicas' memory, each
    record tagged with the phase it started in."""

    def __init__(self, body: bytes):
        self.body, self.phase = body, 0
        self.records: list[tuple[int, float, int | str, str]] = []  # phase, s, status, version
        self.memory: dict[int, dict[int, int]] = {}  # phase -> replica pid -> peak RSS
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, url: str, replicas: list[psutil.Process], clients: int) -> None:
        self._threads = [threading.Thread(target=self._post, args=(url,)) for _ in range(clients)]
        self._threads.append(threading.Thread(target=self._watch, args=(replicas,)))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _post(self, url: str) -> None:
        session = requests.Session()
        headers = {**AUTH, "Content-Type": "image/jpeg"}
        while not self._stop.is_set():
            started, phase = time.perf_counter(), self.phase
            try:
                r = session.post(
                    url + "/v1/classify?model=m", data=self.body, headers=headers, timeout=120
                )
                status, version = r.status_code, r.headers.get("x-model-version", "")
            except requests.RequestException as e:
                status, version = type(e).__name__, ""
            self.records.append((phase, time.perf_counter() - started, status, version))

    def _watch(self, replicas: list[psutil.Process]) -> None:
        while not self._stop.is_set():
            for p in replicas:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                peak = self.memory.setdefault(self.phase, {})
                peak[p.pid] = max(peak.get(p.pid, 0), rss)
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--arch", default="convnext_atto")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()

    import tritonclient.http as triton

    folder = Path(tempfile.mkdtemp(prefix="rollout"))
    first = make_checkpoint(folder, args.arch, args.size)
    second = relabelled(first, folder / "v2.safetensors", str.upper)
    model = {"name": "m", "checkpoint": str(first), "max_batch_size": 8, "torch_threads": 1}
    limits = {"num_replicas": args.replicas, "model_roots": [str(folder)]}
    env = {"CONVNEXT_SERVE_ADMIN_KEYS": ADMIN_KEY}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    phases = [
        ("version 1 alone", None),
        ("canary 5%", versions(str(first), str(second), (95, 5))),
        ("canary 50%", versions(str(first), str(second), (50, 50))),
        ("version 2 at 100%", versions(str(first), str(second), (0, 100))),
        ("version 1 unloaded", versions(str(first), str(second), None)),
    ]
    traffic = Traffic(image_bytes())
    began: dict[int, float] = {}
    for service in run_service(folder, [model], limits, env=env):
        client = triton.InferenceServerClient(
            service.url.removeprefix("http://"), network_timeout=600
        )
        traffic.start(service.url, server_replicas(service.proc.pid), args.clients)
        try:
            for i, (_, config) in enumerate(phases):
                traffic.phase, began[i] = i, time.monotonic()
                if config is not None:
                    client.load_model("m", headers=admin, config=config)
                time.sleep(args.phase_s)
            began[len(phases)] = time.monotonic()
        finally:
            traffic.stop()
    records, memory = traffic.records, traffic.memory

    print(f"{args.clients} clients, {args.replicas} replicas, {args.arch} at {args.size} px\n")
    print("| phase | s | images/s | p50 ms | p99 ms | failed | version 2 | peak RSS vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    base = memory.get(0, {})
    for i, (name, _) in enumerate(phases):
        mine = [r for r in records if r[0] == i]
        ok = sorted(r[1] for r in mine if r[2] == 200)
        seconds = began[i + 1] - began[i]
        failed = sum(r[2] != 200 for r in mine)
        share = sum(r[3] == "2" for r in mine if r[2] == 200) / max(1, len(ok))
        p50 = statistics.median(ok) * 1000 if ok else float("nan")
        p99 = ok[int(0.99 * (len(ok) - 1))] * 1000 if ok else float("nan")
        rss = ", ".join(
            f"{peak / base.get(pid, peak):.2f}x" for pid, peak in sorted(memory.get(i, {}).items())
        )
        print(
            f"| {name} | {seconds:.0f} | {len(ok) / seconds:.1f} | {p50:.0f} | {p99:.0f} | "
            f"{failed} | {share:.0%} | {rss} |"
        )
    print(f"\nfailed requests in all: {sum(r[2] != 200 for r in records)} of {len(records)}")


if __name__ == "__main__":
    main()
