"""Static checks of the deployment files: Dockerfile, docker compose, Prometheus,
Grafana and the KubeRay manifests. There is no Docker engine and no cluster in CI, so each file is
checked with the real linter or schema of its consumer: hadolint, the Compose Specification's
JSON schema, the KubeRay CRDs (ray.io/v1), Kubernetes' own OpenAPI schemas (kubernetes-validate),
promtool, Ray Serve's ServeDeploySchema. tests/test_prometheus.py runs the service, a real
Prometheus with deploy/prometheus/prometheus.yml and every query of the Grafana dashboard.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = ROOT / "tests" / "schemas"  # the KubeRay CRDs' and Compose's schemas (README there)
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "convnext-serve.json"
OLDEST_K8S = "1.28.0"  # the oldest Kubernetes docs/DEPLOY.md supports (and the latest)


def schema_file(*parts: str) -> Path:
    path = SCHEMAS.joinpath(*parts)
    assert path.is_file(), f"{path} is missing: the schemas travel with the project"
    return path


def tool(name: str) -> str:
    """A command-line tool of the dev extra (in the venv's bin) or of the system."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} not found: install the dev tools (pip install -e '.[dev]')"
    return found


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))


def image_pins() -> dict[str, str]:
    """deploy/requirements-image.txt as {distribution name: version}."""

    from packaging.requirements import Requirement

    pins = {}
    for line in (DEPLOY / "requirements-image.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the image pins exact versions"
            pins[canonical(req.name)] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]  # the last stage is the image
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", (
        "the image runs as a numeric non-root user (Kubernetes runAsNonRoot checks the number)"
    )
    assert re.search(r"^HEALTHCHECK .*\n?.*http://127\.0\.0\.1:8000/healthz", final, re.M)
    assert re.search(r"^EXPOSE 8000 8080$", final, re.M)
    assert '\nENTRYPOINT ["convnext-serve", "run"]' in final
    assert re.search(r'^CMD \["--config", "/opt/convnext-serve/serve_config.yaml"', final, re.M)
    # The demo models are baked where CONVNEXT_SERVE_DEMO_DIR points.
    assert "CONVNEXT_SERVE_DEMO_DIR=/opt/convnext-serve/demo" in final
    assert "COPY --from=demo /opt/convnext-serve/demo /opt/convnext-serve/demo" in final
    assert "build_demo_models(Path('/opt/convnext-serve/demo'))" in text
    # CUDA by default, CPU-only with --build-arg TORCH_FLAVOR=cpu: a PyTorch wheel index.
    args = dockerfile_args()
    assert args["TORCH_FLAVOR"].startswith("cu")
    assert "https://download.pytorch.org/whl/${TORCH_FLAVOR}" in text


def test_dockerignore_admits_what_the_dockerfile_copies():
    """The build context is an allow-list: every COPY source must be let in, nothing else."""
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and r[0] != "#"]
    assert rules[0] == "*", ".dockerignore starts by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copies = re.findall(
        r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", (ROOT / "Dockerfile").read_text(), re.M
    )
    sources = {src.rstrip("/") for line in copies for src in line.split()}
    assert sources, "no COPY found"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert src in allowed, f"COPY {src}: not let in by .dockerignore"


def test_image_pins_satisfy_pyproject():
    """Every runtime dependency is pinned in the image, at a version pyproject.toml allows."""
    from packaging.requirements import Requirement

    pins = image_pins()
    args = dockerfile_args()
    pins["torch"] = args["TORCH_VERSION"]
    pins["torchvision"] = args["TORCHVISION_VERSION"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonical(dep.name)
        assert name in pins, f"{dep}: not pinned in deploy/requirements-image.txt"
        assert dep.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {dep}"
    ray_line = next(
        line
        for line in (DEPLOY / "requirements-image.txt").read_text().splitlines()
        if line.startswith("ray[")
    )
    assert {"serve", "train"} <= set(Requirement(ray_line).extras)


# ----------------------------------------------------------------------------- docker compose


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_spec():
    schema = json.loads(schema_file("compose", "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(compose())
    ]
    assert not errors, "\n".join(errors)


def test_compose_wiring():
    services = compose()["services"]
    gpu, cpu = services["serve-gpu"], services["serve-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert cpu["build"]["args"]["TORCH_FLAVOR"] == "cpu" and "deploy" not in cpu
    for svc in (gpu, cpu):
        assert (DEPLOY / svc["build"]["context"] / "Dockerfile").is_file()
        assert "8000:8000" in svc["ports"] and "8080" in svc["expose"]
    # Every bind mount's source exists (relative to deploy/, where the compose file is).
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: mounts missing {source}"
    # Prometheus scrapes the service's network alias on the metrics port ...
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert port == "8080"
    for svc in (gpu, cpu):
        assert host in svc["networks"]["default"]["aliases"]
    # ... and Grafana gets the datasource at the Prometheus service and the dashboards folder.
    grafana = "\n".join(services["grafana"]["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "convnext-serve.yml").read_text())[
        "providers"
    ]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool missing (Debian package prometheus, installed by .ci/run)")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- Grafana dashboard

# Names Ray exports with a `ray_` prefix: this service's (service/metrics.py) and Ray's own.
# Ray Serve builds some of its names at run time, so the ray_serve_* names the dashboard uses are
# listed here; tests/test_prometheus.py proves them against a live Ray.
RAY_SERVE_METRICS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_deployment_queued_queries",
}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def service_metrics() -> dict[str, str]:
    """{name as docs/operations.md writes it: kind}, read from service/metrics.py."""
    source = (ROOT / "service" / "metrics.py").read_text()
    found = re.findall(r'(Counter|Gauge|Histogram)\(\s*"(convnext_serve_\w+)"', source)
    return {name: kind for kind, name in found}


def exported_names(name: str, kind: str) -> set[str]:
    """The series names Prometheus sees for one Ray metric (Ray adds `ray_`, `_total`...)."""
    base = f"ray_{name}"
    if kind == "Counter":
        return {base if base.endswith("_total") else f"{base}_total"}
    if kind == "Histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def known_metric_names() -> set[str]:
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    names = {n for name, kind in service_metrics().items() for n in exported_names(name, kind)}
    return names | RAY_SERVE_METRICS | {f"ray_{name}" for name in METRICS_GAUGES}


def dashboard_panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]  # collapsed rows hold their panels
    return [p for p in panels if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p["targets"]]


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small tokenizer, enough for dashboards)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        follows = expr[m.end() :].lstrip()[:1]
        if m.group() not in PROMQL_WORDS and follows != "(":  # functions and aggregations
            names.add(m.group())
    return names


def test_dashboard_is_valid_and_uses_only_existing_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard_panels()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    known = known_metric_names()
    used = set()
    for panel in panels:
        assert panel["targets"], f"{panel['title']}: no query"
        for grid in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][grid], int)
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == f"${{{var['name']}}}", panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']}"
            unknown = names - known
            assert not unknown, f"{panel['title']}: unknown metric(s) {sorted(unknown)}"
            used |= names
    # The dashboard shows every documented metric.
    for name, kind in service_metrics().items():
        assert exported_names(name, kind) & used, f"no panel shows {name}"
    # The panels of GPU and CPU use and of the replicas.
    assert {"ray_node_gpus_utilization", "ray_node_cpu_utilization"} <= used
    assert "ray_serve_deployment_replica_healthy" in used


def test_promql_metric_names():
    expr = (
        "histogram_quantile(0.95, sum by (model, le) "
        '(rate(ray_a_bucket{x=~"a|b"}[$__rate_interval]))) / on() (sum(ray_b) or vector(0)) * 100'
    )
    assert promql_metric_names(expr) == {"ray_a_bucket", "ray_b"}


# ----------------------------------------------------------------------------- Kubernetes


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_objects() -> list[dict]:
    """What `kubectl apply -k deploy/k8s` sends: kubectl's kustomize when there, else the files."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    docs = []
    for resource in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return k8s_objects()


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def test_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == manifests, f"unlisted: {manifests - listed}, missing: {listed - manifests}"


def strict(schema):
    """A CRD schema that rejects unknown fields, as `kubectl apply` (strict field validation)
    does: Kubernetes prunes fields a structural schema does not name, jsonschema ignores them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_schema(filename: str) -> dict:
    """A KubeRay CRD's v1 object schema (`tests/schemas/extract_crd.py` wrote it)."""
    return strict(json.loads(schema_file("kuberay", filename).read_text()))


def check(schema: dict, obj: dict) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]
    assert not errors, "\n".join(errors)


def test_rayservice_and_its_raycluster_match_the_kuberay_crds(objects):
    service = one(objects, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    check(crd_schema("rayservice.v1.json"), service)
    # The RayCluster KubeRay makes from rayClusterConfig, against the RayCluster CRD.
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "convnext-serve-raycluster"},
        "spec": service["spec"]["rayClusterConfig"],
    }
    check(crd_schema("raycluster.v1.json"), cluster)


def test_strict_crd_schema_catches_typos(objects):
    service = copy.deepcopy(one(objects, "RayService"))
    service["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    with pytest.raises(AssertionError, match="enableInTreeAutoscalling"):
        check(crd_schema("rayservice.v1.json"), service)


def pod_templates(service: dict) -> list[dict]:
    spec = service["spec"]["rayClusterConfig"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_core_objects_match_kubernetes_schemas(objects):
    """Kubernetes' own schemas for the core objects, also those inside the RayService: the
    serving Service and every Ray pod template (as KubeRay passes them on to Kubernetes)."""
    import kubernetes_validate

    service = one(objects, "RayService")
    core = [o for o in objects if "/" not in o["apiVersion"] or o["apiVersion"].startswith("apps/")]
    core.append({"apiVersion": "v1", "kind": "Service", **service["spec"]["serveService"]})
    for i, template in enumerate(pod_templates(service)):
        core.append(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"ray-pod-{i}"},
                "template": template,
            }
        )
    errors = []
    for version in (OLDEST_K8S, kubernetes_validate.latest_version()):
        for obj in core:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = "/".join(map(str, e.absolute_path))
                errors.append(
                    f"{obj['kind']} {obj['metadata']['name']} {version} {where}: {e.message}"
                )
    assert not errors, "\n".join(errors)


def test_ray_cluster_layout(objects):
    service = one(objects, "RayService")
    spec = service["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == image_pins()["ray"], "rayVersion must be the image's Ray"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head schedules no model work"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == 1
    ]
    assert gpu_groups, "a worker group with nvidia.com/gpu: 1"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (ray,) = group["template"]["spec"]["containers"]
        probe = ray["readinessProbe"]["httpGet"]
        assert probe["path"] == "/-/healthz", "readiness: the Serve proxy's health route"
        assert probe["port"] == next(
            p["containerPort"] for p in ray["ports"] if p["name"] == "serve"
        )
    images = set()
    for group in [head, *spec["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], container["name"]
            assert resources["requests"]["memory"] == resources["limits"]["memory"]
            images.add(container["image"])
    assert len(images) == 1, f"head and workers run one image: {images}"
    assert service["spec"]["serveService"]["spec"]["ports"][0]["port"] == 8000


def test_podmonitor_scrapes_port_8080_of_every_ray_pod(objects):
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for template in pod_templates(one(objects, "RayService")):
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"PodMonitor misses pods labelled {labels}"
        ray = template["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert ports.get(endpoint["port"]) == 8080


def test_serve_config_v2_is_the_serve_config(objects):
    """The RayService embeds deploy/serve_config.yaml verbatim."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from service.config import AppConfig

    embedded = one(objects, "RayService")["spec"]["serveConfigV2"]
    expected = (DEPLOY / "serve_config.yaml").read_text()
    assert embedded == expected, "serveConfigV2 is out of date: run python deploy/k8s/render.py"
    config = yaml.safe_load(embedded)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}  # the serveService port
    for app in config["applications"]:
        args = AppConfig.from_args(app["args"])
        for model in args.models:
            assert model.autoscaling_config, f"{model.name}: no Serve autoscaling"
            AutoscalingConfig(**model.autoscaling_config)


def test_render_script_is_idempotent():
    sys.path.insert(0, str(K8S))
    try:
        import render
    finally:
        sys.path.remove(str(K8S))
    manifest = (K8S / "rayservice.yaml").read_text()
    serve_config = (DEPLOY / "serve_config.yaml").read_text()
    assert render.render(manifest, serve_config) == manifest
    changed = render.render(manifest, serve_config + "# one more line\n")
    assert yaml.safe_load(changed)["spec"]["serveConfigV2"].endswith("# one more line\n")
    assert render.render(changed, serve_config) == manifest


def test_image_carries_the_ray_serving_settings():
    """KubeRay nodes start Ray themselves: the image must set what `convnext-serve run` sets."""
    from service.run import RAY_SERVING_ENV

    dockerfile = (ROOT / "Dockerfile").read_text()
    for key, value in RAY_SERVING_ENV.items():
        assert f"{key}={value}" in dockerfile or f'{key}="{value}"' in dockerfile, key


def test_image_starts_haproxy_with_its_configs_limits():
    """KubeRay's nodes start HAProxy without `convnext-serve run`: the image names the script
    that adds the service's rules (installed where pip puts console scripts in the Python
    image) and carries the limits of the config it serves, which the RayService embeds."""
    from service.config import read_serve_config
    from service.haproxy_front import RULES_ENV
    from service.run import front_rules

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RAY_SERVE_HAPROXY_BINARY_PATH=/usr/local/bin/convnext-serve-haproxy" in dockerfile
    assert (
        'convnext-serve-haproxy = "service.haproxy_front:main"'
        in (ROOT / "pyproject.toml").read_text()
    )
    rules = re.search(rf"{RULES_ENV}='([^']*)'", dockerfile)
    expected = front_rules(read_serve_config(ROOT / "deploy" / "serve_config.yaml"))
    assert rules and json.loads(rules.group(1)) == json.loads(expected.to_env())


def test_grace_periods_cover_the_drain(objects):
    """SIGTERM finishes the requests in flight (service/run.py): compose and Kubernetes wait
    longer than that before they kill, and a worker pod drains its node before Ray stops."""
    from service.run import drain_timeout_s

    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    drain = drain_timeout_s(config)
    for name, svc in compose()["services"].items():
        if name.startswith("serve-"):
            assert int(svc["stop_grace_period"].removesuffix("s")) > drain, name
    for group in one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        (ray,) = spec["containers"]
        script = " ".join(ray["lifecycle"]["preStop"]["exec"]["command"])
        waits = int(re.search(r"seq (\d+)", script).group(1))
        assert "ray drain-node" in script and script.rstrip().endswith("ray stop")
        assert spec["terminationGracePeriodSeconds"] > waits >= 30 + 5  # longest request + 5
