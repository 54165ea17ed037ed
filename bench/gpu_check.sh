#!/usr/bin/env bash
# The GPU checks of the serving hot path, as one script for a lent GPU machine (see README,
# "Benchmark: the service against the raw model"): the GPU decode tests; the raw ConvNeXt-T
# 224^2 at its best batch in fp32 (TF32), bf16 and bf16 + torch.compile; then the service over
# HTTP in bf16 at concurrency 64 and 256 with GPU and CPU decode, one and eight 640x480 JPEGs a
# request. Logs and tables go to $OUT (default ./gpu-out). About 12 minutes on one H200, so in
# two calls under a 10-minute limit: `bench/gpu_check.sh raw`, then `bench/gpu_check.sh serve`.
set -uo pipefail
STAGE=${1:-all}  # raw (decode tests and the raw model), serve, or all
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
make setup >"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
command -v wrk >/dev/null || (apt-get install -y wrk >>"$OUT/setup.log" 2>&1 || true)
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
if [ "$STAGE" != serve ]; then
.venv/bin/python -m pytest -q tests/test_gpu_decode.py 2>&1 | tee "$OUT/gpu_decode_tests.log" | tail -5
for precision in fp32 bf16; do
  timeout 120 .venv/bin/python bench/serve_bench.py --precision "$precision" --seconds 5 \
    --raw-only 2>&1 | tee "$OUT/raw_${precision}.log" | grep -E '^\(a\)'
done
timeout 240 .venv/bin/python bench/serve_bench.py --precision bf16 --compile --seconds 5 \
  --raw-only --batches 64 128 256 2>&1 | tee "$OUT/raw_bf16_compile.log" | grep -E '^\(a\)'
fi
if [ "$STAGE" != raw ]; then
for n in 1 8; do
  timeout 300 .venv/bin/python bench/serve_bench.py --precision bf16 --seconds 8 \
    --concurrency 64 256 --gpu-replicas 4 --skip-naive --images-per-request "$n" \
    2>&1 | tee "$OUT/serve_bench_bf16_${n}_per_request.log" | grep -E '^\(|^\|'
done
fi
