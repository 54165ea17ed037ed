"""`convnext-serve run` when a model cannot be served: it stops with the reason, at once."""

import subprocess
import sys
import time

import pytest
import yaml

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance
from models.cpu import cpu_description, has_native_bf16

from .live_service import free_port


@pytest.mark.skipif(has_native_bf16(), reason="this CPU runs bf16: the replica loads")
def test_bf16_on_a_cpu_without_it_stops_run_with_the_reason(tmp_path):
    """Not a replica that fails request after request, nor a wait for the ready timeout: Serve
    gives up on the replica's constructor, and `run` exits 1 saying why."""
    meta = CheckpointMeta(
        task="classify", arch="convnext_atto", head="linear", num_classes=3,
        labels=["a", "b", "c"], image_size=32, provenance=Provenance(source="trained"),
    )  # fmt: skip
    ckpt = save_checkpoint(build_model("convnext_atto", num_classes=3), tmp_path / "c.safetensors",
                           meta)  # fmt: skip
    config = {
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [{
            "name": "convnext-serve", "route_prefix": "/", "import_path": "service.app:build_app",
            "args": {"models": [{"name": "colours", "checkpoint": str(ckpt),
                                 "precision": "bf16"}]},
        }],
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "service.cli", "run", "--config", str(tmp_path / "config.yaml"),
           "--metrics-port", str(free_port()), "--num-cpus", "4"]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("convnext-serve: ")]
    assert len(ours) == 1, done.stderr[-3000:]
    reason = ours[0]
    assert reason.startswith("convnext-serve: application 'convnext-serve' failed to deploy: ")
    assert "server: " in reason and "model 'colours'" in reason
    assert "no native bf16" in reason and "set precision: fp32" in reason
    assert cpu_description() in reason
    assert time.monotonic() - start < 240  # well before the 600 s ready timeout


def test_pretrained_release_is_downloaded_converted_and_served(tmp_path):
    """`convnext-serve run --pretrained convnext_tiny_1k`: the official file from the mirror
    (here a file:// folder holding a ConvNeXt-T in the release's own format), converted with
    the ImageNet labels, served; the page and /v1/classify answer."""
    import io
    import os
    import signal

    import requests
    import torch
    from PIL import Image

    from models.convert import OFFICIAL_RELEASES
    from models.labels import imagenet1k_labels

    from . import official_convnext as official

    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    torch.save({"model": official.ConvNeXt().state_dict()},
               mirror / OFFICIAL_RELEASES["convnext_tiny_1k"].filename)  # fmt: skip
    env = {**os.environ, "CONVNEXT_SERVE_WEIGHTS_URL": mirror.as_uri(),
           "CONVNEXT_SERVE_CACHE": str(cache)}  # fmt: skip
    env.pop("CONVNEXT_SERVE_API_KEYS", None)
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "run", "--pretrained", "convnext_tiny_1k",
           "--port", str(port), "--metrics-port", str(free_port()), "--num-cpus", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        (served,) = requests.get(url + "/v1/models", timeout=10).json()["models"]
        assert served["name"] == "convnext_tiny_1k"
        assert served["metadata"]["arch"] == "convnext_tiny"
        assert served["metadata"]["provenance"]["dataset"] == "imagenet-1k"
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (200, 40, 40)).save(buf, "JPEG")
        r = requests.post(url + "/v1/classify", data=buf.getvalue(), timeout=60,
                          headers={"Content-Type": "image/jpeg"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["predictions"][0]["label"] in imagenet1k_labels()
        assert requests.get(url + "/", timeout=10).status_code == 200
        assert (cache / "served" / "convnext_tiny_1k.safetensors").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
