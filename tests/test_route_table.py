"""The route table (`service.route_table`): every path the HTTP app answers is in it, with the
label, key rule and protocol the guard, the errors and HAProxy's rules read from it."""

from __future__ import annotations

import re

import pytest

from service.haproxy_front import API_PATHS
from service.route_table import API_PREFIXES, GRPC, OTHER, route_of
from service.routes import router
from service.v2 import router as v2_router


@pytest.mark.parametrize(
    "path, endpoint, api, protocol, task",
    [
        ("/v1/classify", "classify", True, "v1", "classify"),
        ("/v1/detect", "detect", True, "v1", "detect"),
        ("/v1/segment", "segment", True, "v1", "segment"),
        ("/v1/models", "models", True, "v1", None),
        ("/v1/nothing", "other", True, "v1", None),  # a key is asked before the 404
        ("/v1/pipelines/shapes", "pipeline", True, "v1", None),
        ("/v1/pipelines", "other", True, "v1", None),
        ("/healthz", "healthz", False, "v1", None),
        ("/readyz", "readyz", False, "v1", None),
        ("/", "root", False, "v1", None),
        ("/docs", "docs", False, "v1", None),
        ("/openapi.json", "other", False, "v1", None),
        ("/foo/classify", "other", False, "v1", None),  # a name in a path is no endpoint
        ("/v2", "v2_metadata", False, "v2", None),
        ("/v2/health/live", "v2_health", False, "v2", None),
        ("/v2/health/ready", "v2_health", False, "v2", None),
        ("/v2/models/m", "v2_metadata", True, "v2", None),
        ("/v2/models/m/versions/1", "v2_metadata", True, "v2", None),
        ("/v2/models/m/ready", "v2_ready", True, "v2", None),
        ("/v2/models/m/versions/1/ready", "v2_ready", True, "v2", None),
        ("/v2/models/m/infer", "v2_infer", True, "v2", None),
        ("/v2/models/m/infer/", "v2_infer", True, "v2", None),
        ("/v2/models/infer", "v2_metadata", True, "v2", None),  # a model named "infer"
        ("/v2/models/ready/versions/2", "v2_metadata", True, "v2", None),
        ("/v2/models/readyX", "v2_metadata", True, "v2", None),
        ("/v2/models/m/inferX", "v2_metadata", True, "v2", None),
        ("/v2/models/m/versions/1/infer", "v2_infer", True, "v2", None),
        ("/v2/elsewhere", "other", False, "v2", None),
        ("/v2x/models", "other", False, "v1", None),
    ],
)
def test_each_path_has_its_route(path, endpoint, api, protocol, task):
    route = route_of(path)
    assert (route.endpoint, route.api, route.protocol, route.task) == (
        endpoint,
        api,
        protocol,
        task,
    )


def test_only_inference_routes_infer_and_only_classify_is_fast():
    assert [p for p in ("/v1/classify", "/v1/detect", "/v1/segment") if route_of(p).infers]
    assert route_of("/v2/models/m/infer").infers and not route_of("/v2/models/m").infers
    assert not route_of("/v1/models").infers
    assert [
        p for p in ("/v1/classify", "/v1/detect", "/v2/models/m/infer") if route_of(p).fast
    ] == ["/v1/classify"]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "m", path)


def test_every_route_of_the_app_is_in_the_table():
    """A route added to the app without a row here would be counted as `other` and take no
    key: the table must know every path the app answers."""
    paths = [r.path for r in router.routes] + [r.path for r in v2_router.routes]
    assert len(paths) >= 15
    for path in paths:
        route = route_of(_concrete(path))
        assert route is not OTHER and route.endpoint != "other", path
        assert route.api == _concrete(path).startswith(API_PREFIXES), path


def test_haproxy_refuses_on_the_tables_api_routes():
    assert API_PATHS.split() == list(API_PREFIXES)


def test_every_grpc_method_mirrors_an_http_route():
    http = {
        "grpc_health": "/v2/health/live",
        "grpc_metadata": "/v2",
        "grpc_ready": "/v2/models/m/ready",
        "grpc_infer": "/v2/models/m/infer",
        "grpc_repository": "/v2/repository/index",
    }
    for method, route in GRPC.items():
        mirrored = route_of(http[route.endpoint])
        assert route.protocol == "grpc"
        assert route.admin == mirrored.admin, method
        if method != "ModelMetadata":  # server metadata is open, a model's needs the key
            assert route.api == mirrored.api, method
    assert GRPC["ModelMetadata"].api and route_of("/v2/models/m").api
