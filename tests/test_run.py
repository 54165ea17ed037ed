"""`convnext-serve run` as a user starts it: a model that cannot load stops it with the reason,
at once; one that cannot warm up is refused while Serve replaces its replica; pretrained
releases download; the demo models join as they finish training."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance

from .http_mirror import http_mirror
from .live_service import free_port, get_json, proxy_ports_env, server_replicas, stop


def test_a_model_that_cannot_load_stops_run_with_the_reason(tmp_path):
    """Not a replica that fails request after request, nor a wait for the ready timeout: Serve
    gives up on the replica's constructor, and `run` exits 1 saying why. The checkpoint's
    metadata reads well (three labels), its head holds four classes: only loading it fails."""
    meta = CheckpointMeta(
        task="classify",
        arch="convnext_atto",
        head="linear",
        num_classes=3,
        labels=["a", "b", "c"],
        image_size=32,
        provenance=Provenance(source="trained"),
    )
    ckpt = save_checkpoint(
        build_model("convnext_atto", num_classes=4), tmp_path / "c.safetensors", meta
    )
    config = {
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [
            {
                "name": "convnext-serve",
                "route_prefix": "/",
                "import_path": "service.app:build_app",
                "args": {"models": [{"name": "colours", "checkpoint": str(ckpt)}]},
            }
        ],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "--config",
        str(tmp_path / "config.yaml"),
        "--metrics-port",
        str(free_port()),
        "--num-cpus",
        "4",
    ]
    start = time.monotonic()
    env = {**os.environ, **proxy_ports_env()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("convnext-serve: ")]
    assert len(ours) == 1, done.stderr[-3000:]
    reason = ours[0]
    assert reason.startswith("convnext-serve: application 'convnext-serve' failed to deploy: ")
    assert "server: " in reason and "model 'colours'" in reason
    assert "tensors do not match convnext_atto" in reason and "head.weight" in reason
    assert time.monotonic() - start < 240  # well before the 600 s ready timeout


def test_a_model_that_fails_to_warm_up_is_refused_and_its_replica_restarted(tmp_path):
    """A model that loads but cannot run (`compile: true` where there is no C++ compiler):
    /readyz names it as not ready, its requests get 503 `model_unavailable` with the reason,
    and the replica's health check fails, so Serve replaces the replica."""

    import requests

    meta = CheckpointMeta(
        task="classify",
        arch="convnext_atto",
        head="linear",
        num_classes=3,
        labels=["a", "b", "c"],
        image_size=32,
        provenance=Provenance(source="trained"),
    )
    ckpt = save_checkpoint(
        build_model("convnext_atto", num_classes=3), tmp_path / "c.safetensors", meta
    )
    port = free_port()
    model = {"name": "compiled", "checkpoint": str(ckpt), "compile": True, "warmup_batches": 1}
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "convnext-serve",
                "route_prefix": "/",
                "import_path": "service.app:build_app",
                "args": {"models": [model]},
            }
        ],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "--config",
        str(tmp_path / "config.yaml"),
        "--metrics-port",
        str(free_port()),
        "--num-cpus",
        "4",
    ]
    env = {
        **os.environ,
        **proxy_ports_env(),
        "CXX": "/nonexistent/g++",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
    }
    env.pop("CONVNEXT_SERVE_API_KEYS", None)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def refused() -> requests.Response | None:
        """The classify answer once the application is up (it waits for the warm-up)."""
        try:
            if requests.get(url + "/healthz", timeout=2).status_code != 200:
                return None
            return requests.post(
                url + "/v1/classify",
                data=b"\xff\xd8",
                timeout=60,
                headers={"Content-Type": "image/jpeg"},
            )
        except requests.RequestException:
            return None

    try:
        deadline = time.monotonic() + 300
        answer = None
        while time.monotonic() < deadline and proc.poll() is None and answer is None:
            answer = refused()
            time.sleep(0.5)
        assert answer is not None, log.read_text()[-3000:]
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "model_unavailable" and "C++ compiler" in error["message"]
        assert int(answer.headers["Retry-After"]) >= 1
        ready = requests.get(url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "compiled" in ready.text
        first = {p.pid for p in server_replicas(proc.pid)}
        while time.monotonic() < deadline and (
            not server_replicas(proc.pid) or {p.pid for p in server_replicas(proc.pid)} == first
        ):
            time.sleep(0.5)
        assert first and {p.pid for p in server_replicas(proc.pid)} - first, "not replaced"
    finally:
        stop(proc)


def test_pretrained_release_is_downloaded_converted_and_served(tmp_path):
    """`convnext-serve run --pretrained convnext_tiny_1k`: the official file downloaded over
    HTTP from the mirror (here a local server holding a ConvNeXt-T in the release's own
    format), converted with the ImageNet labels, served; the page and /v1/classify answer."""
    import torch

    from models.convert import OFFICIAL_RELEASES

    from . import official_convnext as official

    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    torch.save(
        {"model": official.ConvNeXt().state_dict()},
        mirror / OFFICIAL_RELEASES["convnext_tiny_1k"].filename,
    )
    with http_mirror(mirror) as mirror_url:
        _serve_pretrained(mirror_url, cache)


def _serve_pretrained(mirror_url: str, cache: Path) -> None:
    """`convnext-serve run --pretrained convnext_tiny_1k` with the weights at `mirror_url`."""
    import io

    import requests
    from PIL import Image

    from models.labels import imagenet1k_labels

    env = {
        **os.environ,
        **proxy_ports_env(),
        "CONVNEXT_SERVE_WEIGHTS_URL": mirror_url,
        "CONVNEXT_SERVE_CACHE": str(cache),
    }
    env.pop("CONVNEXT_SERVE_API_KEYS", None)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "--pretrained",
        "convnext_tiny_1k",
        "--port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--num-cpus",
        "4",
    ]
    log = cache.parent / "run.log"  # a file: a pipe nobody reads would stall the progress bars
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        (served,) = get_json(url + "/v1/models")["models"]
        assert served["name"] == "convnext_tiny_1k"
        assert served["metadata"]["arch"] == "convnext_tiny"
        assert served["metadata"]["provenance"]["dataset"] == "imagenet-1k"
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (200, 40, 40)).save(buf, "JPEG")
        r = requests.post(
            url + "/v1/classify",
            data=buf.getvalue(),
            timeout=60,
            headers={"Content-Type": "image/jpeg"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["predictions"][0]["label"] in imagenet1k_labels()
        assert requests.get(url + "/", timeout=10).status_code == 200
        assert (cache / "served" / "convnext_tiny_1k.safetensors").is_file()
    finally:
        stop(proc)


def test_demo_models_join_the_running_service_as_they_finish(tmp_path):
    """`convnext-serve run` on a machine without the demo models: the classifier is trained
    first and served; the detector and the segmenter train in the background, shown with their
    progress in /readyz and /v1/models and refused with 503 `model_training` until each joins
    the service (smoke recipes: a few steps each)."""

    import psutil
    import requests

    from service.schemas import ModelsResponse, Readiness

    env = {
        **os.environ,
        **proxy_ports_env(),
        "CONVNEXT_SERVE_DEMO_DIR": str(tmp_path / "demo"),
        "CONVNEXT_SERVE_DEMO_SMOKE": "1",
    }
    env.pop("CONVNEXT_SERVE_API_KEYS", None)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "--port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--num-cpus",
        "4",
    ]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def served() -> dict:
        return get_json(url + "/v1/models")

    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(url + "/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        assert proc.poll() is None and ready.status_code == 200, log.read_text()[-3000:]
        # the first answer: the classifier, while the others are still to come
        assert ready.json()["models"] == ["shapes-classifier"]
        replicas = {p.pid for p in server_replicas(proc.pid)}
        assert {t["name"] for t in ready.json()["training"]} == {
            "shapes-detector",
            "shapes-segmenter",
        }
        listed = served()
        ModelsResponse.model_validate(listed)
        Readiness.model_validate(ready.json())
        assert [m["name"] for m in listed["models"]] == ["shapes-classifier"]
        states = {t["name"]: t["state"] for t in listed["training"]}
        assert set(states) == {"shapes-detector", "shapes-segmenter"}
        assert set(states.values()) <= {"waiting", "synthesising", "training", "done"}
        photo = _shape_photo()
        jpeg = {"Content-Type": "image/jpeg"}
        r = requests.post(url + "/v1/classify", data=photo, headers=jpeg, timeout=60)
        assert r.status_code == 200, r.text
        r = requests.post(url + "/v1/segment", data=photo, headers=jpeg, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_training", r.text
        assert "shapes-segmenter" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 600
        # the background training yields the CPU to the service
        assert _trainer_niceness(proc.pid) == 10
        # each joins once trained, and answers
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and len(served()["models"]) < 3:
            time.sleep(1)
        assert sorted(m["name"] for m in served()["models"]) == [
            "shapes-classifier",
            "shapes-detector",
            "shapes-segmenter",
        ], log.read_text()[-3000:]
        while time.monotonic() < deadline and (
            requests.get(url + "/readyz", timeout=10).status_code != 200
        ):
            time.sleep(0.5)
        listed = served()
        assert listed["training"] == [] and all(m["ready"] for m in listed["models"])
        for task in ("detect", "segment"):
            r = requests.post(f"{url}/v1/{task}", data=photo, headers=jpeg, timeout=60)
            assert r.status_code == 200, r.text
        # joined in place: the replicas that served the classifier serve them all
        assert replicas and {p.pid for p in server_replicas(proc.pid)} == replicas
        text = log.read_text()
        assert "training detect, segment in the background" in text
        assert text.count("trained: joining the service") >= 1
        progress = json.loads((tmp_path / "demo" / "detect.progress.json").read_text())
        assert progress["state"] == "done" and "bbox_AP" in progress["metrics"]
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert not [
        c
        for c in children
        if c.is_running()
        and c.status() != psutil.STATUS_ZOMBIE
        and "models.demo" in " ".join(c.cmdline())
    ]


def _trainer_niceness(pid: int, timeout_s: float = 30) -> int | None:
    """The niceness the service's `models.demo` child settles at (it lowers its own priority
    once started), or None if no such child ran."""
    import psutil

    deadline, nice = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "models.demo" in " ".join(child.cmdline()):
                    nice = child.nice()
            except psutil.Error:
                continue
        if nice:
            return nice
        time.sleep(0.1)
    return nice


def _shape_photo() -> bytes:
    """A JPEG like the demo's data: a red square on a grey ground."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (160, 120), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((40, 30, 100, 90), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    return buf.getvalue()
