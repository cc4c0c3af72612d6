#!/usr/bin/env bash
# The GPU check, in one go, for a machine that already has torch, Triton, nvcc and pytest (it
# downloads nothing):
#   0. builds the extension in place with its CUDA kernels (ROSE_KERNELS_CUDA=1, sm_90 only:
#      TORCH_CUDA_ARCH_LIST=9.0; sources compile side by side) and installs the package editable;
#   1. the GPU tests: tests/test_cuda.py (each CUDA op against the CPU op, a pool over 2^31
#      elements, compute-sanitizer), then tests/test_triton.py and tests/test_triton_host.py, which
#      run every whole-step test for both GPU backends (triton and cuda): exactness against the
#      reference, CUDA-graph replay also after the caches were emptied, no host sync in step();
#   2. bench/bench_gpu.py: step time of both backends vs torch.optim.AdamW(fused=True) on
#      BERT-large and a 1.3B layout, and SELECT on 1e9 scores against one read.
# The three stages are capped at 150 + 220 + 200 s (BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT), so
# that the whole script fits in one 10-minute command.
# Writes env.txt, build.txt, tests.txt, bench.txt, gpu-step.md/.json and summary.md to $OUT
# (default bench/results/device-<date>). Set ROSE_GIT_REV to the revision (the copy has no .git).
#
#   ROSE_GIT_REV=$(git rev-parse --short HEAD) OUT=/tmp/out bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device-$(date +%F)}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

{
  date -Is
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "git ${ROSE_GIT_REV:-unknown}"
} 2>&1 | tee "$OUT/env.txt"

start=$(date +%s)
ROSE_KERNELS_CUDA=1 timeout "${BUILD_TIMEOUT:-150}" python setup.py build_ext --inplace > "$OUT/build.txt" 2>&1
build_rc=$?
echo "build: exit $build_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.txt" "$OUT/env.txt"
[ $build_rc -ne 0 ] && grep -iE "error" "$OUT/build.txt" | head -20
python -c "import rose_kernels.ops as o; print('extension:', o.available(), 'cuda kernels:', o.built_with_cuda(), o.EXTENSION_ERROR or '')" 2>&1 | tee -a "$OUT/env.txt"
ROSE_KERNELS_NO_EXTENSION=1 python -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  > "$OUT/install.txt" 2>&1 || echo "install failed (see install.txt); running from the source tree" | tee -a "$OUT/env.txt"

start=$(date +%s)
timeout "${TEST_TIMEOUT:-220}" python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py \
  tests/test_triton_host.py --maxfail=20 --durations=8 2>&1 | tee "$OUT/tests.txt" | tail -25
test_rc=${PIPESTATUS[0]}
echo "tests: exit $test_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.txt"

start=$(date +%s)
timeout "${BENCH_TIMEOUT:-200}" python bench/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -40
bench_rc=${PIPESTATUS[0]}
echo "bench: exit $bench_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"

{
  echo "# Device check $(date -Is)"; echo
  echo '```'; cat "$OUT/env.txt"; echo '```'; echo
  echo "build: exit $build_rc"; echo
  echo "tests: exit $test_rc"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3; echo
  echo "bench: exit $bench_rc"; echo
  [ -f "$OUT/gpu-step.md" ] && cat "$OUT/gpu-step.md"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit $(( build_rc != 0 || test_rc != 0 || bench_rc != 0 ))
