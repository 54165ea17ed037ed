"""A Ray cluster on this machine, as KubeRay runs one: a head node and, where asked, a worker
node, each a `ray start --block` of its own on a loopback address of its own (Ray turns
127.0.0.1 into the machine's own address), with token authentication on. The service goes on
with `serve deploy` through the head's dashboard, as KubeRay's `serveConfigV2` does.

Everything it starts is a child of one of the `ray start` processes, and is stopped by process
id at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests
import yaml

from .ports import WORKER_PORTS, free_port

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
BIN = Path(sys.executable).parent


class RayCluster:
    """`with RayCluster(nodes=2) as cluster: cluster.deploy(config)`."""

    def __init__(self, nodes: int = 1, cpus_per_node: int = 4, env: dict[str, str] | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="rc"))  # short: Ray's socket paths are limited
        self.nodes, self.cpus = nodes, cpus_per_node
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            **(env or {}),
        }
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://{HEAD_IP}:{self.dashboard_port}"
        self.nodes_started: list[subprocess.Popen] = []
        self.node_of: dict[str, subprocess.Popen] = {}
        self.logs: list[Path] = []
        self.left_running: list[int] = []  # after stop(): processes that would not end

    # ------------------------------------------------------------------- lifecycle

    def __enter__(self) -> RayCluster:
        try:
            self._start_node(HEAD_IP, head=True)
            self.wait(lambda: self._dashboard_up(), 120, "the head's dashboard")
            if self.nodes > 1:
                self._start_node(WORKER_IP, head=False)
            self.wait(lambda: len(self.alive_nodes()) == self.nodes, 120, "every node")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind, *exc) -> None:
        self.stop()
        if kind is None:  # kept where the cluster failed, for its logs
            shutil.rmtree(self.folder, ignore_errors=True)

    def _start_node(self, ip: str, head: bool) -> None:
        named = ["node-manager", "object-manager", "runtime-env-agent", "dashboard-agent-grpc"]
        named += ["dashboard-agent-listen", "metrics-export"]
        ports = [x for name in named for x in (f"--{name}-port", free_port())]
        # 200 worker ports a node (a restarted node's apart from its predecessor's, whose
        # sockets may linger), outside the kernel's ephemeral range
        low = WORKER_PORTS.start + 200 * len(self.nodes_started)
        assert low + 199 < WORKER_PORTS.stop, "more nodes started than there are worker ports"
        ports += ["--min-worker-port", low, "--max-worker-port", low + 199]
        args = [str(BIN / "ray"), "start", "--block", "--node-ip-address", ip]
        args += ["--num-cpus", str(self.cpus), "--disable-usage-stats"]
        if head:
            args += ["--head", "--port", str(self.gcs_port), "--temp-dir", str(self.folder)]
            args += ["--include-dashboard", "true", "--dashboard-host", HEAD_IP]
            args += ["--dashboard-port", str(self.dashboard_port)]
            args += ["--ray-client-server-port", str(free_port())]
        else:
            args += ["--address", f"{HEAD_IP}:{self.gcs_port}"]
        args += [str(p) for p in ports]
        log = self.folder / f"node-{ip}.log"
        if log not in self.logs:
            self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.nodes_started.append(proc)
        self.node_of[ip] = proc

    def kill_worker(self) -> None:
        """SIGKILL the worker node, every process of it at once, as a machine or pod lost."""
        node = psutil.Process(self.node_of[WORKER_IP].pid)
        family = [node, *node.children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(family, timeout=30)
        self.node_of[WORKER_IP].wait()

    def restart_worker(self) -> None:
        """A new worker node on the worker's address, as Kubernetes restarts a lost pod."""
        self._start_node(WORKER_IP, head=False)

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM to every process of the nodes at once (each `ray start` and all its
        descendants: a node stopping on its own stops its processes one by one, each with a
        grace period of its own), SIGKILL to those still running after `grace_s`; by process
        id."""
        family = []
        for proc in self.nodes_started:
            with contextlib.suppress(psutil.NoSuchProcess):
                node = psutil.Process(proc.pid)
                family += [node, *node.children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(alive, timeout=30)
        for proc in self.nodes_started:
            proc.wait(timeout=30)  # reaped
        self.left_running = [p.pid for p in alive]
        self.nodes_started = []

    # ---------------------------------------------------------------------- state

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    def _dashboard_up(self) -> bool:
        try:
            return requests.get(self.dashboard + "/api/version", timeout=5).status_code < 500
        except requests.RequestException:
            return False

    def _ray(self, command: str) -> list[dict]:
        """A `ray` CLI command (its words split at spaces) against this cluster's dashboard:
        its JSON answer."""
        args = [*command.split(), "--address", self.dashboard]
        out = subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        try:
            if out.returncode == 0:
                return json.loads(out.stdout)
        except ValueError:
            pass  # a state API still starting can answer with nothing
        raise RuntimeError(f"ray {' '.join(args)}: {out.stdout[-500:]} {out.stderr[-2000:]}")

    def alive_nodes(self) -> list[dict]:
        try:
            listed = self._ray("list nodes --format json --filter state=ALIVE")
        except RuntimeError:
            return []
        return listed

    def replicas(self) -> dict[str, str]:
        """The server replicas alive: their process ids and the address of their node."""
        listed = self._ray("list actors --format json --detail --limit 1000")
        nodes = {n["node_id"]: n["node_ip"] for n in self.alive_nodes()}
        return {
            str(a["pid"]): nodes.get(a["node_id"], "?")
            for a in listed
            if a["state"] == "ALIVE"
            and a["class_name"].startswith("ServeReplica:")
            and a["class_name"].endswith(":server")
        }

    # -------------------------------------------------------------------- serving

    def deploy(self, config: dict) -> None:
        """`serve deploy` a serve config through the head's dashboard."""
        path = self.folder / f"serve-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            [str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def wait(self, done, timeout_s: float, what: str) -> None:
        """Until `done()`; fails after `timeout_s` with the nodes' logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {timeout_s:g} s\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in self.logs if p.exists())
