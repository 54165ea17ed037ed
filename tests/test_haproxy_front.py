"""`convnext-serve-haproxy` on the config Ray Serve's own template writes: the rules land where
they should, HAProxy accepts the result, and a config it does not know is left alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from service.config import AppConfig
from service.haproxy_front import (
    MARK,
    FrontRules,
    add_rules,
    config_path,
    real_haproxy,
    rewrite_config,
    write_error_files,
)
from service.run import front_rules

RULES = FrontRules(shed_at=16, retry_after_s=2, body_timeout_s=3.5)


def ray_config(folder: Path) -> Path:
    """The config Ray Serve 's HAProxy manager writes for one application with two replicas
    (its private API: the point is to follow its template wherever it goes). Ray is pinned
    and required, so a moved template is a failure to look into, not a skip."""
    try:
        from ray.serve._private import haproxy
    except ImportError as e:
        pytest.fail(f"Ray moved its HAProxy template (ray.serve._private.haproxy): {e}")
    path = folder / "haproxy.cfg"
    cfg = haproxy.HAProxyConfig(
        socket_path=str(folder / "admin.sock"),
        server_state_base=str(folder),
        server_state_file=str(folder / "server-state"),
        metrics_socket_path=str(folder / "metrics.sock"),
        enable_hap_optimization=False,
    )
    servers = [haproxy.ServerConfig(f"replica{i}", "127.0.0.1", 40000 + i) for i in range(2)]
    backend = haproxy.BackendConfig(
        name="http-convnext", path_prefix="/", servers=servers, app_name="convnext-serve"
    )
    api = haproxy.HAProxyApi(cfg, {"convnext-serve": backend}, config_file_path=str(path))
    api._generate_config_file_internal()
    return path


def haproxy_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [real_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


def section(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(header)
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()),
        len(lines),
    )
    return lines[start:end]


def test_the_rules_land_in_rays_config_and_haproxy_accepts_it(tmp_path):
    path = ray_config(tmp_path)
    assert haproxy_check(path).returncode == 0  # Ray's own, as a baseline
    assert rewrite_config(path, RULES)
    text = path.read_text()
    check = haproxy_check(path)
    assert check.returncode == 0, check.stderr
    frontend = section(text, "frontend http_frontend")
    assert "    option http-buffer-request" in frontend
    assert "    timeout http-request 3500ms" in frontend
    backend = "\n".join(section(text, "backend http-convnext"))
    assert "nbsrv,mul(16)" in backend and "hdr Retry-After 2" in backend
    assert "errorfile 502" in backend and "errorfile 503" in backend
    # the default backend (404s) and the stats listener are untouched
    assert MARK not in "\n".join(section(text, "backend default_backend"))
    # the error files HAProxy sends are whole HTTP responses with the service's JSON
    for name, status, code in (
        ("convnext-408.http", 408, "request_timeout"),
        ("convnext-503.http", 503, "unavailable"),
    ):
        head, body = (tmp_path / name).read_bytes().decode().split("\r\n\r\n", 1)
        assert head.startswith(f"HTTP/1.1 {status} ")
        assert f"Content-Length: {len(body)}" in head
        assert json.loads(body)["error"]["code"] == code
    assert "Retry-After: 2" in (tmp_path / "convnext-503.http").read_text()


def test_the_refusal_bodies_are_the_services_json(tmp_path):
    text = add_rules(ray_config(tmp_path).read_text(), RULES, tmp_path)
    bodies = [
        line.split("string '", 1)[1].split("' if", 1)[0]
        for line in text.splitlines()
        if "http-request return status 503" in line and "Retry-After" in line
    ]
    v2, v1 = (json.loads(b) for b in bodies)
    assert v1["error"]["code"] == "overloaded" and isinstance(v2["error"], str)


def test_rewriting_twice_changes_nothing(tmp_path):
    path = ray_config(tmp_path)
    rewrite_config(path, RULES)
    once = path.read_text()
    rewrite_config(path, RULES)
    assert path.read_text() == once


def test_without_a_limit_only_buffering_and_error_pages_are_added(tmp_path):
    text = add_rules(ray_config(tmp_path).read_text(), FrontRules(shed_at=None), tmp_path)
    assert "option http-buffer-request" in text and "nbsrv" not in text


def test_a_config_of_another_layout_is_left_as_ray_wrote_it(tmp_path, capsys):
    path = tmp_path / "haproxy.cfg"
    other = "global\n    maxconn 10\nfrontend web\n    bind :0\n    default_backend b\nbackend b\n"
    path.write_text(other)
    assert not rewrite_config(path, RULES)
    assert path.read_text() == other
    assert "started as Ray wrote it" in capsys.readouterr().err


def test_the_script_finds_rays_config_argument():
    assert config_path(["-db", "-f", "/tmp/x/haproxy.cfg", "-sf", "12"]) == Path(
        "/tmp/x/haproxy.cfg"
    )
    assert config_path(["-v"]) is None


def test_the_limit_is_what_a_server_replica_holds():
    """HAProxy refuses where a replica surely would: its in-flight limit, or every model's
    calls and waiting line when those are fewer; an unbounded line leaves the limit."""
    model = {"checkpoint": "demo:classify", "max_ongoing_requests": 8, "max_queued_requests": 8}
    args = {"models": [{"name": "a", **model}, {"name": "b", **model}]}
    assert AppConfig.from_args(args).server_capacity() == 32
    args["server"] = {"max_in_flight": 20, "retry_after_s": 3, "body_timeout_s": 7}
    assert AppConfig.from_args(args).server_capacity() == 20
    unbounded = {"models": [{"name": "a", "checkpoint": "x", "max_queued_requests": -1}]}
    assert AppConfig.from_args(unbounded).server_capacity() == 256
    config = {"applications": [{"import_path": "service.app:build_app", "args": args}]}
    assert front_rules(config) == FrontRules(20, 3, 7.0)
    assert front_rules({"applications": [{"import_path": "other:app"}]}).shed_at is None


def test_the_rules_travel_in_one_environment_variable(monkeypatch):
    monkeypatch.setenv("CONVNEXT_SERVE_HAPROXY_RULES", RULES.to_env())
    assert FrontRules.from_env() == RULES
    monkeypatch.delenv("CONVNEXT_SERVE_HAPROXY_RULES")
    assert FrontRules.from_env() == FrontRules(shed_at=None)


def test_error_files_are_rewritten_with_the_rules(tmp_path):
    write_error_files(tmp_path, FrontRules(shed_at=4, retry_after_s=9, body_timeout_s=1))
    assert "Retry-After: 9" in (tmp_path / "convnext-503.http").read_text()
    assert "within 1 s" in (tmp_path / "convnext-408.http").read_text()
