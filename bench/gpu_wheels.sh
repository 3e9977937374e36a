#!/usr/bin/env bash
# Here (not on the device): fills .whl/ with what `bench/gpu_checks.sh` installs on the device —
# tgis's packages, built from this tree, and the wheels the device image lacks (gRPC and protobuf
# at the versions the packages need; FlashInfer and its own needs, ../shared/notes/gpu-kernels.md).
# .whl/ and the caches gpu_checks.sh brings back are git-ignored through .git/info/exclude (the
# device tool carries ignored paths only when a call names them). Run again after code changes:
# only tgis's wheels are rebuilt, the downloads stay.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
for ignored in /.whl/ /.fi-cache.txz /.torch-cache.txz /.fi-cache/ /.torch-cache/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
rm -f .whl/tgis_*.whl
python3 -m pip wheel -q --no-deps -w .whl packages/tgis-proto packages/tgis-shard packages/tgis-router packages/tgis-models-*
# The device runs CPython 3.12 on x86-64; pip matches each manylinux tag exactly.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl protobuf==7.36.2 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  flashinfer-python==0.6.12 apache-tvm-ffi==0.1.15.post2 cuda-tile==1.7.0 einops==0.8.2 nvidia-cudnn-frontend==1.32.0 \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-ml-py==13.615.71 tabulate==0.10.0
du -sh .whl
