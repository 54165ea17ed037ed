# syntax=docker/dockerfile:1
# convnext-serve: the service, its demo models and Ray in one image. The same image is the
# docker-compose service and the KubeRay head and worker image (deploy/k8s), so that every Ray
# process of a cluster runs the same Ray, Python and project code.
#
#   docker build -t convnext-serve:0.1.0 .                                   # CUDA (default)
#   docker build -t convnext-serve:0.1.0-cpu --build-arg TORCH_FLAVOR=cpu .  # CPU only, smaller
#   docker run --gpus all -p 8000:8000 -p 8080:8080 convnext-serve:0.1.0
#
# CUDA comes with PyTorch's wheels (CUDA runtime, cuDNN, NCCL as pip packages), so the base is a
# plain Python image; the host only needs the NVIDIA driver and the NVIDIA Container Toolkit.
# TORCH_FLAVOR names a PyTorch wheel index: cu130 needs driver >= 580; pick an older CUDA flavour
# that PyTorch publishes for TORCH_VERSION when the nodes run an older driver.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- dependencies, pinned
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_FLAVOR=cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# wget: KubeRay's injected liveness/readiness probes run `wget` for Ray < 2.53 and older operators.
# Debian packages are not version-pinned: a stable release only ships security fixes, and an old
# pinned version disappears from the archive; the base image tag pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
# torch and torchvision from PyTorch's own index: its CUDA or CPU-only build of the pinned version.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOR}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY deploy/requirements-image.txt /tmp/requirements-image.txt
RUN pip install --requirement /tmp/requirements-image.txt

# ---------------------------------------------------------------- demo models (build stage)
# `convnext-serve demo-models` trains the three demo models on synthetic shapes (about 20-30 min
# on 2 CPUs, seeded). Only models/ is copied here, so a change to service/ does not retrain them.
FROM deps AS demo
WORKDIR /src
COPY models ./models
RUN python -c "from pathlib import Path; from models.demo import build_demo_models; \
build_demo_models(Path('/opt/convnext-serve/demo'))"

# ---------------------------------------------------------------- the image
FROM deps AS runtime
COPY pyproject.toml README.md /tmp/src/
COPY models /tmp/src/models
COPY service /tmp/src/service
# --no-deps: every dependency is already installed at its pinned version; `pip check` fails the
# build if pyproject.toml asks for something requirements-image.txt does not provide.
RUN pip install --no-deps /tmp/src && pip check && rm -rf /tmp/src
COPY deploy/serve_config.yaml /opt/convnext-serve/serve_config.yaml
COPY --from=demo /opt/convnext-serve/demo /opt/convnext-serve/demo
# uid 1000 "ray": numeric, so Kubernetes' runAsNonRoot can verify it; the home holds caches.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash ray
USER 1000:1000
WORKDIR /home/ray
# demo:<task> checkpoints resolve here. NVIDIA_DRIVER_CAPABILITIES makes the container toolkit
# mount the CUDA driver and NVML (Ray's GPU metrics); which GPUs are visible is left to the
# runtime (compose's device reservation, the Kubernetes device plugin), so a pod that asks for
# no GPU (the KubeRay head) sees none. The RAY_* settings are service/run.py's RAY_SERVING_ENV
# (user code and router on the replica's event loop, buffered request logs, images in-band
# rather than through the object store, HTTP through Ray Serve's HAProxy front straight into
# the server replicas), here too so KubeRay's `ray start` nodes get them; and HAProxy starts
# through convnext-serve-haproxy with serve_config.yaml's limits (service/haproxy_front.py;
# `convnext-serve run` sets them from the config it runs).
ENV HOME=/home/ray \
    CONVNEXT_SERVE_DEMO_DIR=/opt/convnext-serve/demo \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 \
    RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000 \
    RAY_SERVE_LOG_TO_STDERR=0 \
    RAY_max_direct_call_object_size=1048576 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2 \
    RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response junk-response" \
    RAY_SERVE_HAPROXY_TUNE_BUFSIZE=262144 \
    RAY_SERVE_HAPROXY_BINARY_PATH=/usr/local/bin/convnext-serve-haproxy \
    CONVNEXT_SERVE_HAPROXY_RULES='{"shed_at": 256, "retry_after_s": 1, "body_timeout_s": 30.0}'
# 8000: HTTP API (Ray Serve's HAProxy front); 8080: Prometheus metrics (Ray's metrics export port).
EXPOSE 8000 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# KubeRay replaces the entry point with its own `ray start` command line, so the image works
# unchanged there; docker run / compose get the service. Arguments after the image name replace
# CMD, e.g. `--config /etc/convnext-serve/my.yaml --num-cpus 8`.
ENTRYPOINT ["convnext-serve", "run"]
CMD ["--config", "/opt/convnext-serve/serve_config.yaml", "--metrics-port", "8080"]
