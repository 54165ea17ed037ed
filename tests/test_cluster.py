"""The service on a Ray cluster as KubeRay runs it (`tests/ray_cluster.py`: `ray start` nodes,
token authentication, `serve deploy` through the dashboard), under load from a client while
configs whose change is only their models are deployed: a second version as a canary, then in
place of the first, then one that cannot load. The versions swap inside the running replicas
(the same process ids), each taking requests only once warm, and no request fails."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import requests

from .ports import free_port
from .ray_cluster import HEAD_IP, RayCluster
from .service_models import relabelled, service_checkpoints
from .test_service import photo

pytestmark = [pytest.mark.needs_models("service"), pytest.mark.slow]


def serve_config(port: int, models: list[dict]) -> dict:
    app = {
        "name": "convnext-serve",
        "route_prefix": "/",
        "import_path": "service.app:build_app",
        "args": {"models": models, "server": {"num_replicas": 2}},
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [app],
    }


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


def wait_for(done, timeout_s: float, what: str, cluster: RayCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:g} s\n{cluster.log_tail()}")


def test_a_deploy_of_new_model_versions_swaps_them_in_place_under_load(tmp_path):
    ckpt = service_checkpoints()
    upper = relabelled(ckpt["classify"], tmp_path / "upper.safetensors", str.upper)
    settings = {"max_batch_size": 4, "torch_threads": 1, "warmup_batches": 1}
    port = free_port()
    url = f"http://{HEAD_IP}:{port}"

    def versions(*listed: tuple[int, str, float]) -> dict:
        return {
            "name": "colours",
            "versions": [{"version": v, "checkpoint": str(c), "weight": w} for v, c, w in listed],
            **settings,
        }

    with RayCluster(nodes=1) as cluster:
        cluster.deploy(
            serve_config(
                port, [{"name": "colours", "checkpoint": str(ckpt["classify"]), **settings}]
            )
        )
        wait_for(lambda: _status(url + "/readyz") == 200, 300, "the service ready", cluster)
        replicas = cluster.replicas()
        assert len(replicas) == 2, replicas
        with Load(url, photo("red", box=(60, 20, 280, 220))[0]) as load:
            wait_for(lambda: len(load.answers) >= 20, 60, "answers under load", cluster)
            # a canary: version 2 beside version 1, half the traffic
            mark = len(load.answers)
            cluster.deploy(
                serve_config(port, [versions((1, ckpt["classify"], 50), (2, upper, 50))])
            )
            wait_for(
                lambda: Counter(v for _, v, _ in load.since(mark)).get("2", 0) >= 20,
                180,
                "version 2 answering",
                cluster,
            )
            # version 2 alone
            cluster.deploy(serve_config(port, [versions((2, upper, 1))]))
            mark2 = len(load.answers)
            wait_for(
                lambda: [v for _, v, _ in load.since(mark2)][-20:] == ["2"] * 20,
                180,
                "version 2 alone",
                cluster,
            )
            # a version whose checkpoint is not there: said, and version 2 serves on
            missing = tmp_path / "missing.safetensors"
            cluster.deploy(serve_config(port, [versions((2, upper, 1), (3, missing, 1))]))
            wait_for(
                lambda: (
                    "colours"
                    in requests.get(url + "/v1/models", timeout=10).json()["update_errors"]
                ),
                180,
                "the update error listed",
                cluster,
            )
            mark3 = len(load.answers)
            wait_for(lambda: len(load.since(mark3)) >= 20, 60, "answers after the error", cluster)
        assert cluster.replicas() == replicas  # the same processes: nothing restarted
    failed = [a for a in load.answers if a[0] != 200]
    assert not failed, (len(failed), len(load.answers), failed[:5])
    assert set(load.readiness) == {200}, Counter(load.readiness)
    by_version = {(v, label) for _, v, label in load.answers}
    assert by_version == {("1", "red"), ("2", "RED")}  # each version answers as itself
    assert {v for _, v, _ in load.since(mark3)} == {"2"}


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def test_the_repository_api_loads_a_canary_and_unloads_it_in_every_replica(tmp_path):
    """tritonclient's own repository calls, with an admin key, against two replicas: a load
    answers once both serve the new version; a checkpoint outside the model roots is refused
    (403), one that cannot load is answered with the reason (the model serving on); an unload
    ends the model; no request of the load running beside fails, nothing restarts."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    ckpt = service_checkpoints()
    roots = tmp_path / "models"
    roots.mkdir()
    upper = relabelled(ckpt["classify"], roots / "upper.safetensors", str.upper)
    (roots / "broken.safetensors").write_bytes(b"not a checkpoint")
    port = free_port()
    url = f"http://{HEAD_IP}:{port}"
    admin = {"Authorization": "Bearer admin-key"}
    colours = {"name": "colours", "checkpoint": str(ckpt["classify"]), "max_batch_size": 4}
    config = serve_config(port, [colours])
    config["applications"][0]["args"]["server"]["model_roots"] = [str(roots)]

    def canary(second: str) -> str:
        versions = [
            {"version": 1, "checkpoint": str(ckpt["classify"]), "weight": 1},
            {"version": 2, "checkpoint": second, "weight": 1},
        ]
        return json.dumps({"versions": versions})

    with RayCluster(nodes=1, env={"CONVNEXT_SERVE_ADMIN_KEYS": "admin-key"}) as cluster:
        cluster.deploy(config)
        wait_for(lambda: _status(url + "/readyz") == 200, 300, "the service ready", cluster)
        replicas = cluster.replicas()
        client = triton.InferenceServerClient(f"{HEAD_IP}:{port}", network_timeout=600)
        with Load(url, photo("red", box=(60, 20, 280, 220))[0]) as load:
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("colours", config=canary(str(upper)))  # no admin key
            assert "admin key" in refused.value.message()
            client.load_model("colours", headers=admin, config=canary(str(upper)))
            # both replicas serve version 2 now: every listing says so
            for _ in range(10):
                listed = requests.get(url + "/v1/models", timeout=10).json()["models"]
                assert [(m["version"], m["ready"]) for m in listed] == [("1", True), ("2", True)]
            index = client.get_model_repository_index(headers=admin)
            assert {(e["name"], e.get("version"), e["state"]) for e in index} == {
                ("colours", "1", "READY"),
                ("colours", "2", "READY"),
            }
            mark = len(load.answers)
            wait_for(
                lambda: "2" in {v for _, v, _ in load.since(mark)},
                60,
                "version 2 answering",
                cluster,
            )
            outside = str(tmp_path / "elsewhere.safetensors")
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("colours", headers=admin, config=canary(outside))
            assert (
                refused.value.status() == "403"
                and "outside the model roots" in refused.value.message()
            )
            broken = str(roots / "broken.safetensors")
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("colours", headers=admin, config=canary(broken))
            assert "could not be served" in refused.value.message(), refused.value.message()
            listed = requests.get(url + "/v1/models", timeout=10).json()["models"]
            assert [m["version"] for m in listed] == ["1", "2"]  # the canary serves on
            client.unload_model("colours", headers=admin)
            r = requests.post(
                url + "/v1/classify?model=colours", files={"image": photo("red")[0]}, timeout=60
            )
            assert r.status_code == 404 and "no classify model" in r.json()["error"]["message"]
            client.load_model("colours", headers=admin)  # back as the config has it
            assert [
                m["version"] for m in requests.get(url + "/v1/models", timeout=10).json()["models"]
            ] == ["1"]
        assert cluster.replicas() == replicas
    failed = [a for a in load.answers if a[0] not in (200, 404)]
    assert not failed, (len(failed), failed[:5])
