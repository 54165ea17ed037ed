"""The service on a two-node Ray cluster as KubeRay runs it (`tests/ray_cluster.py`: `ray
start` nodes with the image's serving environment, token authentication, the shipped serve
config through `serve deploy` at the dashboard), under load from clients: the replicas spread
over both nodes and both serve; configs whose change is only their models (a canary, the new
version alone, one that cannot load) and the model repository API (tritonclient's own calls)
swap versions inside the running replicas (the same process ids) with no failed request; a
canary takes its share of the requests; the worker node killed fails almost nothing, and the
replica count comes back with the node."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import yaml
from tritonclient.utils import InferenceServerException

from service.grpc_api import SERVICER
from service.run import serving_env

from .ports import free_port
from .ray_cluster import BIN, HEAD_IP, WORKER_IP, RayCluster
from .service_models import relabelled, service_checkpoints
from .test_service import photo

pytestmark = [pytest.mark.needs_models("service"), pytest.mark.slow]

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"
ADMIN = {"Authorization": "Bearer admin-key"}
SETTINGS = {"max_batch_size": 4, "torch_threads": 1, "warmup_batches": 1}
RED = photo("red", box=(60, 20, 280, 220))[0]
BOTH_NODES = [HEAD_IP, WORKER_IP]


def shipped_config() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


class Cluster:
    """One Ray cluster for the module's tests, with the service's ports and model roots."""

    def __init__(self, ray: RayCluster, roots: Path):
        self.ray, self.roots = ray, roots
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://{HEAD_IP}:{self.port}"
        self.checkpoints = service_checkpoints()
        self.upper = relabelled(
            self.checkpoints["classify"], roots / "upper.safetensors", str.upper
        )

    def deploy(self, *models: dict) -> None:
        """`serve deploy` of `config(*models)`."""
        self.ray.deploy(self.config(*models))

    def config(self, *models: dict) -> dict:
        """The shipped config with these models, under the server deployment's `user_config`
        (the form Serve updates in place); two replicas at most one a node, one proxy (on the
        head) on every address."""
        config = shipped_config()
        config["proxy_location"] = "HeadOnly"
        config["http_options"] = {"host": "0.0.0.0", "port": self.port}
        config["grpc_options"] = {"port": self.grpc_port, "grpc_servicer_functions": [SERVICER]}
        app = config["applications"][0]
        app["args"].pop("models", None)
        server = app["args"]["server"]
        server.pop("autoscaling_config", None)
        server.update(num_replicas=2, num_cpus=1, model_roots=[str(self.roots)])
        app["deployments"] = [
            {"name": "server", "max_replicas_per_node": 1, "user_config": {"models": list(models)}}
        ]
        return config

    def colours(self, *versions: tuple[int, Path | str, float]) -> dict:
        """Model "colours": the colour classifier as version 1, or these versions."""
        if not versions:
            return {"name": "colours", "checkpoint": str(self.checkpoints["classify"]), **SETTINGS}
        listed = [{"version": v, "checkpoint": str(c), "weight": w} for v, c, w in versions]
        return {"name": "colours", "versions": listed, **SETTINGS}

    def models(self) -> dict:
        """`/v1/models`; while the application is still deploying (Serve's proxy answers for
        it, not JSON), no models."""
        try:
            r = requests.get(self.url + "/v1/models", timeout=10)
            if r.status_code == 200:
                return r.json()
        except (requests.RequestException, ValueError):
            pass
        return {"models": [], "update_errors": {}}

    def convnext_serve(self, *args: str) -> str:
        """`convnext-serve ARGS --address` of this cluster, with its token: what it printed."""
        address = f"{HEAD_IP}:{self.ray.gcs_port}"
        done = subprocess.run(
            [str(BIN / "convnext-serve"), *args, "--address", address],
            env=self.ray.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def wait_for(self, done, timeout_s: float, what: str) -> None:
        self.ray.wait(done, timeout_s, what)

    def ready(self) -> dict[str, str]:
        """Once the service answers ready with a replica on each node: the replicas."""
        self.wait_for(lambda: _status(self.url + "/readyz") == 200, 300, "the service ready")
        self.wait_for(
            lambda: sorted(self.ray.replicas().values()) == BOTH_NODES,
            300,
            "a replica on each node",
        )
        return self.ray.replicas()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    roots = tmp_path_factory.mktemp("models")
    env = {**serving_env(shipped_config()), "CONVNEXT_SERVE_ADMIN_KEYS": "admin-key"}
    with RayCluster(nodes=2, env=env) as ray:
        yield Cluster(ray, roots)
    assert not ray.left_running, f"processes of the cluster still running: {ray.left_running}"


class Load:
    """Clients posting one image to `/v1/classify?model=colours` in a loop, and one asking
    `/readyz`, until stopped: every answer's status, version and top label."""

    def __init__(self, url: str, image: bytes, clients: int = 4):
        self.url, self.image = url, image
        self.answers: list[tuple[int | str, str, str]] = []
        self.timings: list[tuple[float, float, bool]] = []  # (sent, answered, ok) a request
        self.readiness: list[int | str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._classify) for _ in range(clients)]
        self._threads.append(threading.Thread(target=self._ready))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _classify(self) -> None:
        session = requests.Session()
        headers = {"Content-Type": "image/jpeg"}
        while not self._stop.is_set():
            sent = time.monotonic()
            ok = False
            try:
                r = session.post(
                    self.url + "/v1/classify?model=colours",
                    data=self.image,
                    headers=headers,
                    timeout=60,
                )
                label = r.json()["results"][0]["predictions"][0]["label"] if r.ok else r.text[:200]
                self.answers.append((r.status_code, r.headers.get("x-model-version", ""), label))
                ok = r.ok
            except requests.RequestException as e:
                self.answers.append((f"{type(e).__name__}: {e}"[:300], "", ""))
            self.timings.append((sent, time.monotonic(), ok))

    def _ready(self) -> None:
        while not self._stop.is_set():
            try:
                self.readiness.append(requests.get(self.url + "/readyz", timeout=10).status_code)
            except requests.RequestException as e:
                self.readiness.append(type(e).__name__)
            time.sleep(0.2)

    def since(self, start: int) -> list[tuple[int | str, str, str]]:
        return self.answers[start:]


def cpu_seconds(pids) -> dict[str, float]:
    """Each process's CPU time so far."""
    times = {pid: psutil.Process(int(pid)).cpu_times() for pid in pids}
    return {pid: t.user + t.system for pid, t in times.items()}


def test_the_replicas_spread_over_both_nodes_and_a_canary_takes_its_share(cluster):
    """A canary at 20%: over 1,500 requests, within 4 points of it (3.9 standard deviations of
    the draw), and both replicas, one on each node, serve."""
    first, upper = cluster.checkpoints["classify"], cluster.upper
    cluster.deploy(cluster.colours((1, first, 80), (2, upper, 20)))
    cluster.wait_for(
        lambda: (
            [(m["version"], m["weight"]) for m in cluster.models()["models"]]
            == [("1", 80), ("2", 20)]
        ),
        300,
        "both versions listed",
    )
    replicas = cluster.ready()
    busy = cpu_seconds(replicas)
    with Load(cluster.url, RED, clients=6) as load:
        cluster.wait_for(lambda: len(load.answers) >= 1500, 300, "1,500 answers")
    busy = {pid: t - busy[pid] for pid, t in cpu_seconds(replicas).items()}
    answers = load.answers
    assert all(status == 200 for status, _, _ in answers), Counter(a[0] for a in answers)
    versions = Counter(v for _, v, _ in answers)
    share = versions["2"] / len(answers)
    print(f"canary at 20%: {share:.1%} of {len(answers)}; replicas' CPU seconds {busy}")
    assert abs(share - 0.2) < 0.04, versions
    assert {(v, label) for _, v, label in answers} == {("1", "red"), ("2", "RED")}
    # each replica worked for its share: at least a fifth of what both did
    assert min(busy.values()) > 0.2 * sum(busy.values()) / 2, (busy, replicas)


def test_a_deploy_of_new_model_versions_swaps_them_in_place_under_load(cluster):
    cluster.deploy(cluster.colours())
    cluster.wait_for(
        lambda: [m["version"] for m in cluster.models()["models"]] == ["1"], 300, "one version"
    )
    replicas = cluster.ready()
    first, upper = cluster.checkpoints["classify"], cluster.upper
    with Load(cluster.url, RED) as load:
        cluster.wait_for(lambda: len(load.answers) >= 20, 60, "answers under load")
        # a canary: version 2 beside version 1, half the traffic
        mark = len(load.answers)
        cluster.deploy(cluster.colours((1, first, 50), (2, upper, 50)))
        cluster.wait_for(
            lambda: Counter(v for _, v, _ in load.since(mark)).get("2", 0) >= 20,
            180,
            "version 2 answering",
        )
        # version 2 alone
        cluster.deploy(cluster.colours((2, upper, 1)))
        mark = len(load.answers)
        cluster.wait_for(
            lambda: [v for _, v, _ in load.since(mark)][-20:] == ["2"] * 20, 180, "version 2 alone"
        )
        # a version whose checkpoint is not there: said, and version 2 serves on
        cluster.deploy(cluster.colours((2, upper, 1), (3, cluster.roots / "missing", 1)))
        cluster.wait_for(
            lambda: "colours" in cluster.models()["update_errors"], 180, "the update error listed"
        )
        mark = len(load.answers)
        cluster.wait_for(lambda: len(load.since(mark)) >= 20, 60, "answers after the error")
    assert cluster.ray.replicas() == replicas  # the same processes: nothing restarted
    failed = [a for a in load.answers if a[0] != 200]
    assert not failed, (len(failed), len(load.answers), failed[:5])
    assert set(load.readiness) == {200}, Counter(load.readiness)
    by_version = {(v, label) for _, v, label in load.answers}
    assert by_version == {("1", "red"), ("2", "RED")}  # each version answers as itself
    assert {v for _, v, _ in load.since(mark)} == {"2"}


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def test_the_repository_api_loads_a_canary_and_unloads_it_in_every_replica(cluster):
    """tritonclient's own repository calls, with an admin key, against two replicas: a load
    answers once both serve the new version; a checkpoint outside the model roots is refused
    (403), one that cannot load is answered with the reason (the model serving on); an unload
    ends the model and a load brings it back as configured; no request of the load running
    beside fails (but those made while it was unloaded), nothing restarts."""
    (cluster.roots / "broken.safetensors").write_bytes(b"not a checkpoint")
    cluster.deploy(cluster.colours())
    cluster.wait_for(
        lambda: [m["version"] for m in cluster.models()["models"]] == ["1"], 300, "one version"
    )
    replicas = cluster.ready()
    client = triton.InferenceServerClient(f"{HEAD_IP}:{cluster.port}", network_timeout=600)
    first = cluster.checkpoints["classify"]

    def canary(second: Path | str) -> str:
        versions = [
            {"version": 1, "checkpoint": str(first), "weight": 1},
            {"version": 2, "checkpoint": str(second), "weight": 1},
        ]
        return json.dumps({"versions": versions})

    with Load(cluster.url, RED) as load:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("colours", config=canary(cluster.upper))  # no admin key
        assert "admin key" in refused.value.message()
        client.load_model("colours", headers=ADMIN, config=canary(cluster.upper))
        for _ in range(10):  # both replicas serve version 2 now: every listing says so
            listed = cluster.models()["models"]
            assert [(m["version"], m["ready"]) for m in listed] == [("1", True), ("2", True)]
        index = client.get_model_repository_index(headers=ADMIN)
        assert {(e["name"], e.get("version"), e["state"]) for e in index} == {
            ("colours", "1", "READY"),
            ("colours", "2", "READY"),
        }
        over_grpc = triton_grpc.InferenceServerClient(f"{HEAD_IP}:{cluster.grpc_port}")
        lower = {k.lower(): v for k, v in ADMIN.items()}  # gRPC metadata keys are lower case
        index = over_grpc.get_model_repository_index(headers=lower, as_json=True)
        assert {(e["name"], e["version"]) for e in index["models"]} == {
            ("colours", "1"),
            ("colours", "2"),
        }
        mark = len(load.answers)
        cluster.wait_for(
            lambda: "2" in {v for _, v, _ in load.since(mark)}, 60, "version 2 answering"
        )
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("colours", headers=ADMIN, config=canary("/etc/elsewhere"))
        assert refused.value.status() == "403"
        assert "outside the model roots" in refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            broken = cluster.roots / "broken.safetensors"
            client.load_model("colours", headers=ADMIN, config=canary(broken))
        assert "could not be served" in refused.value.message(), refused.value.message()
        assert [m["version"] for m in cluster.models()["models"]] == ["1", "2"]  # serving on
        client.load_model("colours", headers=ADMIN)  # without settings: as the config has it
        assert [m["version"] for m in cluster.models()["models"]] == ["1"]
        client.unload_model("colours", headers=ADMIN)
        gone = requests.post(
            cluster.url + "/v1/classify?model=colours",
            data=RED,
            timeout=60,
            headers={"Content-Type": "image/jpeg"},
        )
        assert gone.status_code == 404 and "no classify model" in gone.json()["error"]["message"]
        client.load_model("colours", headers=ADMIN)  # back as the config has it
        assert [m["version"] for m in cluster.models()["models"]] == ["1"]
    assert cluster.ray.replicas() == replicas
    failed = [a for a in load.answers if a[0] not in (200, 404)]
    assert not failed, (len(failed), failed[:5])


def test_the_worker_node_killed_under_load_fails_almost_nothing(cluster):
    """SIGKILL of every process of the worker node (a lost machine or pod) under load: under
    1% of the requests fail, none waits 30 s, the head's replica answers on within 30 s; a new
    worker node (as Kubernetes restarts the pod) gets the second replica back."""
    cluster.deploy(cluster.colours())
    cluster.wait_for(
        lambda: [m["version"] for m in cluster.models()["models"]] == ["1"], 300, "one version"
    )
    cluster.ready()
    with Load(cluster.url, RED) as load:
        cluster.wait_for(lambda: len(load.answers) >= 50, 60, "answers under load")
        cluster.ray.kill_worker()
        killed = time.monotonic()
        cluster.wait_for(
            lambda: sum(ok for sent, _, ok in load.timings if sent > killed + 1) >= 50,
            30,
            "answers from the head's replica",
        )
        cluster.ray.restart_worker()
        cluster.wait_for(
            lambda: sorted(cluster.ray.replicas().values()) == BOTH_NODES,
            300,
            "a replica on each node again",
        )
        mark = len(load.answers)
        cluster.wait_for(lambda: len(load.since(mark)) >= 50, 60, "answers after")
        # the model repository (its state on the head) serves both replicas on: a load
        # answers once each serves the new version
        client = triton.InferenceServerClient(f"{HEAD_IP}:{cluster.port}", network_timeout=600)
        both = [{"version": 1, "checkpoint": str(cluster.checkpoints["classify"]), "weight": 1}]
        both.append({"version": 2, "checkpoint": str(cluster.upper), "weight": 1})
        client.load_model("colours", headers=ADMIN, config=json.dumps({"versions": both}))
        client.load_model("colours", headers=ADMIN)  # and back as the config has it
    failed = [a for a in load.answers if a[0] != 200]
    slowest = max(answered - sent for sent, answered, _ in load.timings)
    print(f"node killed: {len(failed)} of {len(load.answers)} failed, slowest {slowest:.1f} s")
    assert len(failed) < 0.01 * len(load.answers), (len(failed), len(load.answers), failed[:5])
    assert slowest < 30, slowest


def test_training_runs_one_ray_train_worker_on_each_node(cluster, tmp_path):
    """`convnext-serve train ... --address` onto the cluster (its token from the environment),
    two workers spread one a node: it finishes and writes the served checkpoint."""
    from models.checkpoint import load_checkpoint
    from models.data import synth

    synth("classify", tmp_path / "data", n=32, seed=1, image_size=32, n_val=8)
    out = tmp_path / "spread.safetensors"
    args = ["train", "classify", "--data", str(tmp_path / "data"), "--out", str(out)]
    args += ["--arch", "convnext_atto", "--epochs", "1", "--batch-size", "8"]
    args += ["--image-size", "32", "--loader-workers", "0", "--no-progress"]
    args += ["--num-workers", "2", "--placement", "SPREAD"]
    said = cluster.convnext_serve(*args)
    assert f"Ray Train: 2 workers: 1 on {HEAD_IP}, 1 on {WORKER_IP}" in said, said
    _, meta = load_checkpoint(out)
    assert meta.task == "classify" and meta.provenance.model_extra["recipe"]["num_workers"] == 2


def test_run_with_an_address_deploys_onto_the_cluster(cluster, tmp_path):
    """`convnext-serve run --config ... --address`: onto the running cluster (not a Ray of its
    own), returning once the service answers ready there; its new version (a change to the
    models alone) swaps in place."""
    cluster.deploy(cluster.colours())
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cluster.config(cluster.colours((1, cluster.upper, 1)))))
    said = cluster.convnext_serve("run", "--config", str(path))
    assert f"ready at {cluster.url}" in said, said

    def label() -> str:
        answer = requests.post(
            cluster.url + "/v1/classify?model=colours",
            data=RED,
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        return answer.json()["results"][0]["predictions"][0]["label"]

    cluster.wait_for(lambda: label() == "RED", 120, "the deployed version answering")
