"""The service on a Ray cluster as KubeRay runs it (`tests/ray_cluster.py`: `ray start` nodes,
token authentication, `serve deploy` through the dashboard), under load from a client while
the models change: configs whose change is only their models (a canary, the new version alone,
one that cannot load), then the model repository API (tritonclient's own calls). The versions
swap inside the running replicas (the same process ids), each taking requests only once warm,
and no request fails."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.grpc_api import SERVICER

from .ports import free_port
from .ray_cluster import HEAD_IP, RayCluster
from .service_models import relabelled, service_checkpoints
from .test_service import photo

pytestmark = [pytest.mark.needs_models("service"), pytest.mark.slow]

ADMIN = {"Authorization": "Bearer admin-key"}
SETTINGS = {"max_batch_size": 4, "torch_threads": 1, "warmup_batches": 1}
RED = photo("red", box=(60, 20, 280, 220))[0]


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
        """`serve deploy` of the service with these models, two replicas; the models under the
        server deployment's `user_config`, the form Serve updates in place."""
        server = {"num_replicas": 2, "model_roots": [str(self.roots)]}
        app = {
            "name": "convnext-serve",
            "route_prefix": "/",
            "import_path": "service.app:build_app",
            "args": {"server": server},
            "deployments": [{"name": "server", "user_config": {"models": list(models)}}],
        }
        self.ray.deploy(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "0.0.0.0", "port": self.port},
                "grpc_options": {"port": self.grpc_port, "grpc_servicer_functions": [SERVICER]},
                "applications": [app],
            }
        )

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

    def wait_for(self, done, timeout_s: float, what: str) -> None:
        self.ray.wait(done, timeout_s, what)

    def ready(self) -> None:
        self.wait_for(lambda: _status(self.url + "/readyz") == 200, 300, "the service ready")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    roots = tmp_path_factory.mktemp("models")
    with RayCluster(nodes=1, env={"CONVNEXT_SERVE_ADMIN_KEYS": "admin-key"}) as ray:
        yield Cluster(ray, roots)


class Load:
    """Clients posting one image to `/v1/classify?model=colours` in a loop, and one asking
    `/readyz`, until stopped: every answer's status, version and top label."""

    def __init__(self, url: str, image: bytes, clients: int = 4):
        self.url, self.image = url, image
        self.answers: list[tuple[int | str, str, str]] = []
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
            try:
                r = session.post(
                    self.url + "/v1/classify?model=colours",
                    data=self.image,
                    headers=headers,
                    timeout=60,
                )
                label = r.json()["results"][0]["predictions"][0]["label"] if r.ok else r.text[:200]
                self.answers.append((r.status_code, r.headers.get("x-model-version", ""), label))
            except requests.RequestException as e:
                self.answers.append((f"{type(e).__name__}: {e}"[:300], "", ""))

    def _ready(self) -> None:
        while not self._stop.is_set():
            try:
                self.readiness.append(requests.get(self.url + "/readyz", timeout=10).status_code)
            except requests.RequestException as e:
                self.readiness.append(type(e).__name__)
            time.sleep(0.2)

    def since(self, start: int) -> list[tuple[int | str, str, str]]:
        return self.answers[start:]


def test_a_deploy_of_new_model_versions_swaps_them_in_place_under_load(cluster):
    cluster.deploy(cluster.colours())
    cluster.ready()
    replicas = cluster.ray.replicas()
    assert len(replicas) == 2, replicas
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
        lambda: [m["version"] for m in cluster.models()["models"]] == ["1"], 180, "one version"
    )
    cluster.ready()
    replicas = cluster.ray.replicas()
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
