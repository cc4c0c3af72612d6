#!/usr/bin/env bash
# The GPU check, in one go, for a machine that already has torch, Triton and pytest (it downloads
# nothing):
#   0. installs the package in place, without its C++ extension (seconds; the GPU path is Triton);
#   1. the GPU tests of the Triton backend (tests/test_triton.py and tests/test_triton_host.py on
#      CUDA: exactness against the reference, CUDA-graph replay also after the launch-table caches
#      were emptied, no host sync in step(), device skips reported);
#   2. bench/bench_gpu.py: step time vs torch.optim.AdamW(fused=True) on BERT-large and a 1.3B
#      layout, and SELECT on 1e9 scores against one read.
# Writes env.txt, tests.txt, bench.txt, gpu-step.md/.json and summary.md to $OUT
# (default bench/results/device-<date>). Set ROSE_GIT_REV to the revision (the copy has no .git).
#
#   ROSE_GIT_REV=$(git rev-parse --short HEAD) OUT=/tmp/out bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device-$(date +%F)}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # for the CUDA C++ extension, once there is one
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

{
  date -Is
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "git ${ROSE_GIT_REV:-unknown}"
} 2>&1 | tee "$OUT/env.txt"

ROSE_KERNELS_NO_EXTENSION=1 python -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  > "$OUT/install.txt" 2>&1 || echo "install failed (see install.txt); running from the source tree" | tee -a "$OUT/env.txt"

start=$(date +%s)
timeout "${TEST_TIMEOUT:-260}" python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_host.py -x \
  --durations=5 2>&1 | tee "$OUT/tests.txt" | tail -25
test_rc=${PIPESTATUS[0]}
echo "tests: exit $test_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.txt"

start=$(date +%s)
timeout "${BENCH_TIMEOUT:-240}" python bench/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -40
bench_rc=${PIPESTATUS[0]}
echo "bench: exit $bench_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"

{
  echo "# Device check $(date -Is)"; echo
  echo '```'; cat "$OUT/env.txt"; echo '```'; echo
  echo "tests: exit $test_rc"; grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3; echo
  echo "bench: exit $bench_rc"; echo
  [ -f "$OUT/gpu-step.md" ] && cat "$OUT/gpu-step.md"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit $(( test_rc != 0 || bench_rc != 0 ))
