"""The replica's own limits, where HAProxy is not in front to refuse first; and the public
deploy path (`serve.run`) that `convnext-serve run` falls back to where Ray moves its own.

Without an HAProxy binary (or with `RAY_SERVE_ENABLE_HA_PROXY=0`) `convnext-serve run` falls
back to Ray's Python proxy; the service still answers, and the replica's in-flight limit is
then what refuses a burst. gRPC goes through Ray's gRPC proxy either way, and through the same
data plane as HTTP: the in-flight limit and a model's full queue refuse it as they refuse
HTTP, and its requests are counted in the same metrics.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from service.grpc_api import SERVICER

from .live_service import AUTH, counted_since, free_port, request_counts, run_service
from .service_models import service_checkpoints
from .test_faults import png_rows
from .test_service import error_of, photo

pytestmark = pytest.mark.needs_models("service")

MAX_IN_FLIGHT = 2


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ckpt = service_checkpoints()
    models = [
        {"name": "colours", "checkpoint": str(ckpt["classify"]), "max_batch_size": 4},
        {
            "name": "regions",
            "checkpoint": str(ckpt["segment"]),
            "max_batch_size": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 0,
            "warmup_batches": 1,
        },
    ]
    gateway = {"max_in_flight": MAX_IN_FLIGHT, "max_body_bytes": 2_000_000}
    grpc = {"grpc_options": {"port": free_port(), "grpc_servicer_functions": [SERVICER]}}
    folder = tmp_path_factory.mktemp("limits")
    # and deployed through Ray's public calls, as where Ray moves its config deployment; with
    # RAY_ADDRESS naming a cluster that is not there, which `run` must not try to join
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "CONVNEXT_SERVE_PUBLIC_DEPLOY": "1",
        "RAY_ADDRESS": "127.0.0.9:6999",
    }
    for svc in run_service(folder, models, gateway, grpc, env=env):
        svc.grpc_url = f"127.0.0.1:{grpc['grpc_options']['port']}"
        yield svc


def test_the_public_deploy_path_serves_the_config(service):
    """`serve.start` + `serve.run` of the config's builder (`service.run.deploy`'s fallback)
    serve it as the config path does: the models, the HTTP options, gRPC."""
    log = service.log_path.read_text()
    assert "deploying with serve.run (CONVNEXT_SERVE_PUBLIC_DEPLOY=1)" in log, log[-2000:]
    listed = requests.get(service.url + "/v1/models", headers=AUTH, timeout=10).json()
    assert [m["name"] for m in listed["models"]] == ["colours", "regions"]
    assert triton_grpc.InferenceServerClient(service.grpc_url).is_server_live()


def test_without_haproxy_the_python_proxy_serves(service):
    with pytest.raises(requests.ConnectionError):  # no HAProxy: nothing on its stats port
        requests.get(service.haproxy_stats_url, timeout=5)
    data, _ = photo("blue")
    r = service.post("/v1/classify", [data])
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "blue"


def test_the_replicas_in_flight_limit_refuses_a_burst(service):
    """Six 12-megapixel images to classify at once (each decodes for a while): the replica
    holds `max_in_flight` of them and answers each; the rest get 503 `overloaded` at once."""
    image = png_rows(4000, 3000)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda _: service.post("/v1/classify", [image]), range(3 * MAX_IN_FLIGHT))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 3, statuses
    assert set(statuses) == {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert error_of(refused) == "overloaded" and int(refused.headers["Retry-After"]) >= 1
    assert "in-flight request limit" in refused.json()["error"]["message"]
    assert service.post("/v1/classify", [photo("red")[0]]).status_code == 200


def _slow_grpc_requests(service, model: str, count: int, at_once: int) -> list[str]:
    """`count` gRPC inferences of a large image by `model`, `at_once` of them at a time:
    "ok" for each answered, else the refusal's status and message."""
    image = np.array([png_rows(4000, 3000)], dtype=object)
    key = {"x-api-key": AUTH["X-API-Key"]}

    def infer(_) -> str:
        client = triton_grpc.InferenceServerClient(service.grpc_url)
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(image)
        try:
            client.infer(model, [tensor], headers=key, client_timeout=120)
            return "ok"
        except InferenceServerException as e:
            return f"{e.status()}: {e.message()}"

    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(infer, range(count)))


def test_grpc_meets_a_full_model_queue(service):
    """A model that holds one request and queues none: of two slow gRPC requests at once
    (within the replica's in-flight limit), one is answered and the other gets UNAVAILABLE,
    saying the queue is full."""
    answers = _slow_grpc_requests(service, "regions", MAX_IN_FLIGHT, MAX_IN_FLIGHT)
    assert answers.count("ok") == 1, answers
    refused = [a for a in answers if a != "ok"]
    assert all(a.startswith("StatusCode.UNAVAILABLE") and "full queue" in a for a in refused)


GRPC_INFER = {"by": ("model", "status"), "endpoint": "grpc_infer"}


def test_grpc_meets_the_replicas_in_flight_limit_and_is_counted(service):
    """As HTTP does: six slow gRPC requests at once, `max_in_flight` of them answered and the
    rest refused UNAVAILABLE at the in-flight limit; each counted in
    `convnext_serve_requests_total` under `grpc_infer`: the answered under the model, the
    refused (before any model was resolved, as HTTP's are) under `unknown`."""
    before = request_counts(service, **GRPC_INFER)
    answers = _slow_grpc_requests(service, "colours", 3 * MAX_IN_FLIGHT, 6)
    refused = [a for a in answers if a != "ok"]
    assert answers.count("ok") >= 1 and len(refused) >= 3, answers
    assert all(
        a.startswith("StatusCode.UNAVAILABLE") and "in-flight request limit" in a for a in refused
    ), refused
    wanted = {("colours", "200"): answers.count("ok"), ("unknown", "503"): len(refused)}
    seen = counted_since(service, before, wanted, **GRPC_INFER)
    assert seen == wanted, (seen, answers)
