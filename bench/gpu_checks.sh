#!/usr/bin/env bash
# One device call (the device tool's `run`, from the repository root) for what the CPU cannot
# show: the CUDA tests of the step pipeline and the serving table on the 8B shape.
#
# Here, first: `bash bench/gpu_wheels.sh` builds the wheels the device image lacks into .whl/
# (git-ignored, carried with `carry: [".whl"]`).
# FlashInfer JIT-compiles its kernels into .fi-cache/ (FLASHINFER_WORKSPACE_BASE); the compiled
# ones come back as $OUT/fi-cache.txz: copied to .fi-cache.txz here and carried
# (`carry: [".whl", ".fi-cache.txz", ".torch-cache.txz"]`), the next call skips the compilation
# (.torch-cache.txz the same way, for torch.compile's kernels). xz, not gzip: a file comes back
# only under 16 MiB and the carried tree must stay under 64 MiB (the torch cache: 13 MB gzipped,
# 3.4 MB as xz).
# Then on the device: bash bench/gpu_checks.sh [tests|families|serving [serving.py options]]   (tests and serving by
# default; results land in $OUT). Each stage fits one call's 10 minutes on its own.
# `bash bench/gpu_checks.sh run COMMAND...` runs any command (a bench script, say) the same way:
# wheels installed, caches unpacked before and packed after, its output in $OUT/run.log. A bench
# run outside this script finds no carried cache unpacked: in one such call (2026-12-07 (6)) every
# run compiled for its whole minute.
# STAGE_SECONDS=N stops each stage's Python after N seconds, where the call's own limit would cut
# the script: the compiled caches still come back (without them the next call compiles again).
set -uo pipefail
stage=${1:-all}
limit=()
# SIGINT first: pytest then prints the failures so far (SIGTERM would lose them); killed 20 s later.
[[ -n ${STAGE_SECONDS:-} ]] && limit=(timeout -s INT -k 20 "$STAGE_SECONDS")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PATH="/tmp/site/bin:$PATH"
export FLASHINFER_WORKSPACE_BASE="$PWD/.fi-cache"
# torch.compile's kernels (the fused chains, PT2_COMPILE) likewise: back as $OUT/torch-cache.txz.
# Triton keeps only each kernel's binary and metadata (not its five IRs): the packed torch cache
# stays under the 16 MB a returned file may be (20 MB once with the IRs, and lost).
export TORCHINDUCTOR_CACHE_DIR="$PWD/.torch-cache/inductor" TRITON_CACHE_DIR="$PWD/.torch-cache/triton" \
  TRITON_STORE_BINARY_ONLY=1
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out" "$FLASHINFER_WORKSPACE_BASE" "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
# Carried packed (tar finds the compression itself), where the unpacked caches would pass the carry limit.
# Once per machine: a later stage of the same call finds the caches its earlier stages grew, and
# unpacking the carried archives again would put back older files over them.
unpack() {
  [[ -f $1 && ! -f $2/.unpacked ]] || return 0
  tar -xf "$1" -C "$2" && touch "$2/.unpacked"
}
for packed in .fi-cache.t?z; do unpack "$packed" "$FLASHINFER_WORKSPACE_BASE"; done
for packed in .torch-cache.t?z; do unpack "$packed" .torch-cache; done
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, grpc, google.protobuf as p; print(torch.__version__, transformers.__version__, grpc.__version__, p.__version__)' \
  | tee -a "$out/gpu.txt"
if [[ $stage == tests || $stage == all ]]; then
  # GPU_TESTS: a narrower list of test files (the compile warm-up bench then stays out);
  # GPU_TESTS_K: a pytest -k expression over them (its own variable: it has spaces).
  default_tests="packages/tgis-shard/tests/test_steps.py packages/tgis-shard/tests/test_paged_attention.py
    packages/tgis-shard/tests/test_memory_gpu.py packages/tgis-shard/tests/test_cuda_graphs.py packages/tgis-shard/tests/test_prompt_graphs.py
    packages/tgis-shard/tests/test_pt2_compile.py packages/tgis-shard/tests/test_fused.py
    packages/tgis-shard/tests/test_launch_ahead.py packages/tgis-shard/tests/test_hf_paged.py
    packages/tgis-shard/tests/test_kv_write.py packages/tgis-shard/tests/test_logits.py packages/tgis-shard/tests/test_gated_act.py"
  select=()
  [[ -n ${GPU_TESTS_K:-} ]] && select=(-k "$GPU_TESTS_K")
  # shellcheck disable=SC2086  # the list splits into files on purpose
  # The CPU case of test_fused compiles for the CPU with the device image's torch, not the pinned
  # one CI checks it with (bit for bit there); the device checks the CUDA case.
  "${limit[@]}" python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short --show-capture=no ${GPU_TESTS:-$default_tests} "${select[@]}" \
    --deselect "packages/tgis-shard/tests/test_fused.py::test_each_compiled_chain_equals_its_eager_ops[cpu]" \
    > "$out/gpu-tests.log" 2>&1
  tail -40 "$out/gpu-tests.log"
  [[ -n ${GPU_TESTS:-} ]] || "${limit[@]}" python3 bench/compile_warm_up.py > "$out/compile-warm-up.log" 2>&1
  [[ -n ${GPU_TESTS:-} ]] || tail -15 "$out/compile-warm-up.log"
fi
# families: every model family against transformers on one GPU (and on two where there are two).
if [[ $stage == families ]]; then
  "${limit[@]}" python3 -m pytest -q -p no:cacheprovider -rs -s --show-capture=no packages/tgis-models-*/tests/*_gpu.py \
    > "$out/family-tests.log" 2>&1
  grep -v '^$' "$out/family-tests.log" | tail -40
fi
if [[ $stage == run ]]; then
  "${limit[@]}" "${@:2}" >> "$out/run.log" 2>&1
  grep -v "it/s]" "$out/run.log" | tail -60
fi
# serving: the table; anything after the stage goes to serving.py instead (e.g. --variants default pt2-compile).
serving_args=("${@:2}")
[[ ${#serving_args[@]} -gt 0 ]] || serving_args=(--concurrency 1 8 32 128)
# The log fills as each variant ends, so a run cut off by the call's limit still brings back the rest.
if [[ $stage == serving || $stage == all ]]; then
  # TORCH_LOGS: a compilation after the warm-up shows in the logs (the bench's and the shard's).
  # The model folder outlives the stage: the next serving stage of the call reuses it.
  TORCH_LOGS=recompiles "${limit[@]}" python3 bench/serving.py --shape 8b --model-folder /tmp/bench-models "${serving_args[@]}" \
    --record "$out/serving.md" --server-logs /tmp/server-logs >> "$out/serving.log" 2>&1
  grep -v "it/s]" "$out/serving.log" | tail -60
  # At most 8 files come back from a call: the launchers' logs (every serving stage's) as one.
  tar -czf "$out/server-logs.tgz" -C /tmp server-logs 2>/dev/null
fi
# Every stage ends by packing the caches (the run command need not): each archive is written
# under another name and renamed once whole, so a call cut off while packing brings back the last
# whole one, not a truncated one the next call cannot unpack. xz on every core (-T0).
pack() {
  XZ_OPT=-T0 tar -cJf "$out/$1.part" --exclude=./.unpacked -C "$2" . 2>/dev/null && mv "$out/$1.part" "$out/$1" \
    && ls -la "$out/$1"
}
pack fi-cache.txz "$FLASHINFER_WORKSPACE_BASE"
pack torch-cache.txz .torch-cache
