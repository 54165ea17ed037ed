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
