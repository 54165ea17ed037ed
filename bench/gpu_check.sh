#!/usr/bin/env bash
# The GPU checks of the serving hot path, as one script for a lent GPU machine (see README,
# "Benchmark: the service against the raw model"): the GPU decode tests, then the GPU table for
# ConvNeXt-T 224^2 in bf16 (raw model at its best batch; the service over HTTP at concurrency 64
# and 256 with GPU and CPU decode), one and eight 640x480 JPEGs a request. Logs and tables go to
# $OUT (default ./gpu-out). About 8 minutes on one H200 with 16 cores.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
make setup >"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
command -v wrk >/dev/null || (apt-get install -y wrk >>"$OUT/setup.log" 2>&1 || true)
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
.venv/bin/python -m pytest -q tests/test_gpu_decode.py 2>&1 | tee "$OUT/gpu_decode_tests.log" | tail -5
for n in 1 8; do
  timeout 300 .venv/bin/python bench/serve_bench.py --precision bf16 --seconds 8 \
    --concurrency 64 256 --gpu-replicas 4 --skip-naive --images-per-request "$n" \
    2>&1 | tee "$OUT/serve_bench_bf16_${n}_per_request.log" | grep -E '^\(|^\|'
done
