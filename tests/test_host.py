"""A model inside a replica (`service.host.ModelHost`) in-process, no Ray: its warm-up, the
requests that arrive meanwhile, a warm-up that fails, and `compile: true`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance
from service.config import ModelConfig
from service.errors import ModelUnavailable
from service.host import ModelHost
from service.runtime import BatchItem
from service.tasks import ClassifyOptions

MAX_PIXELS = 10_000_000


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    model = build_model("convnext_atto", num_classes=3)
    meta = CheckpointMeta(
        task="classify",
        arch="convnext_atto",
        head="linear",
        num_classes=3,
        labels=["a", "b", "c"],
        image_size=32,
        provenance=Provenance(source="trained"),
    )
    return save_checkpoint(model, tmp_path_factory.mktemp("host") / "cls.safetensors", meta)


def png(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def host_of(checkpoint, **settings) -> ModelHost:
    config = ModelConfig(name="m", checkpoint=str(checkpoint), **{"max_batch_size": 2, **settings})
    return ModelHost(config, MAX_PIXELS, retry_after_s=3)


def ask(host: ModelHost, image: bytes) -> list:
    return asyncio.run(host.infer([BatchItem(image, ClassifyOptions())], timeout_s=120))


def test_a_request_during_the_warm_up_waits_for_it_and_is_answered(classifier):
    """Not refused: it waits for the warm-up, then gets the answer a warm model gives."""
    warm = host_of(classifier, warmup_batches=0)
    warm.start_warmup()
    warm.warm.result()
    expected = ask(warm, png())

    host = host_of(classifier, warmup_batches=400)  # long enough to be mid-way when asked
    host.start_warmup()
    assert not host.ready

    async def during_warm_up():
        answer = asyncio.create_task(host.infer([BatchItem(png(), ClassifyOptions())], 120))
        await asyncio.sleep(0)  # the request has started and waits
        assert not answer.done() and not host.warm.done()
        return await answer

    answer = asyncio.run(during_warm_up())
    assert host.warm.done() and host.ready  # it was answered only once warm
    assert answer == expected


def _failing_warm_up(checkpoint, tmp_path) -> dict:
    """A `compile: true` host in a process with no C++ compiler: inductor fails at the
    warm-up's first forward. Run apart so the compiler setting and caches are its own."""
    script = textwrap.dedent(f"""
        import asyncio, json
        from service.config import ModelConfig
        from service.errors import ServiceError
        from service.host import ModelHost
        from service.runtime import BatchItem
        from service.tasks import ClassifyOptions

        config = ModelConfig(name="m", checkpoint={str(checkpoint)!r}, compile=True,
                             max_batch_size=1, warmup_batches=1)
        host = ModelHost(config, {MAX_PIXELS}, retry_after_s=3)
        host.start_warmup()
        try:
            asyncio.run(host.infer([BatchItem(b"", ClassifyOptions())], 120))
            answer = None
        except ServiceError as e:
            answer = [e.status, e.code, e.message, e.headers]
        print(json.dumps({{"ready": host.ready, "failure": repr(host.failure()),
                          "answer": answer}}))
    """)
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_model_that_fails_to_warm_up_is_unavailable_with_the_reason(classifier, tmp_path):
    """Its requests get 503 `model_unavailable` with Retry-After and the reason; `failure()`
    (what the replica's health check reads) says it too, so Serve restarts the replica."""
    seen = _failing_warm_up(classifier, tmp_path)
    assert seen["ready"] is False
    assert "No working C++ compiler" in seen["failure"]  # torch.compile was really used
    status, code, message, headers = seen["answer"]
    assert (status, code, headers) == (503, ModelUnavailable.code, {"Retry-After": "3"})
    assert "model 'm' failed to warm up" in message and "C++ compiler" in message


def test_compile_true_answers_as_the_eager_model(classifier):
    eager = host_of(classifier, warmup_batches=0, max_batch_size=1)
    eager.start_warmup()
    compiled = host_of(classifier, warmup_batches=1, max_batch_size=1, compile=True)
    compiled.start_warmup()
    compiled.warm.result()  # compiled at the warm-up, not at the first request
    assert compiled.ready and compiled.describe(1.0)["serving"]["compile"] is True
    for image in (png(), png((20, 200, 90), (64, 48))):
        [want], [got] = ask(eager, image), ask(compiled, image)
        assert [label for label, _ in got] == [label for label, _ in want]
        torch.testing.assert_close(
            torch.tensor([p for _, p in got]),
            torch.tensor([p for _, p in want]),
            atol=1e-4,
            rtol=1e-4,
        )
