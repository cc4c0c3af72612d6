#!/usr/bin/env bash
# The GPU check, in one go, for a rented machine that already has torch, Triton, nvcc and pytest (it
# downloads and installs nothing; no pytest-timeout either), run once, in one 10-minute command:
#
#   stage         cap   what
#   env            30   env.txt: nvidia-smi, python/torch/triton/CUDA, setuptools, CUDA_HOME, git rev
#   build         100   the extension in place with its CUDA kernels (ROSE_KERNELS_CUDA=1, sm_90 only:
#                       TORCH_CUDA_ARCH_LIST=9.0; setup.py compiles the sources side by side)
#   install        20   the extension loads (and has its CUDA kernels); the package installed editable
#   tests-cuda     40   tests/test_cuda.py minus the gpu_heavy tests: each CUDA op against the CPU op;
#                       tests/test_op_family.py: the extension registers the CUDA kernels it says it has
#   tests-triton  145   tests/test_triton.py tests/test_triton_host.py (and tests/test_devices.py where
#                       the tree has it): every whole-step test for both GPU backends (cold Triton
#                       cache, opcheck and torch.compile included)
#   tests-heavy    70   the gpu_heavy tests, last: a pool over 2^31 scores, compute-sanitizer memcheck
#                       (its own limit ROSE_SANITIZER_TIMEOUT = this cap - 35 s; it skips where the
#                       sanitizer says the device is not supported)
#   bench          75   bench/bench_gpu.py --out $OUT: both backends vs torch.optim.AdamW(fused=True)
#                       on BERT-large and a 1.3B layout, SELECT on 1e9 scores
#   total         480
#
# Why these caps: the lease is 15 minutes of device time in all, a few of them the machine's start
# and the transfers, and one command may run 10 minutes; 480 s leaves a margin inside both. The
# build is one nvcc per .cu file side by side (~1 min seen for sm_90 alone); tests-triton gets the
# most, as it compiles every Triton kernel variant cold for two backends; tests-cuda is ~60 small
# op tests; tests-heavy is ~25 s of 2^31-element work plus the sanitizer; bench_gpu.py writes its
# report after every configuration, so a bench cut at its cap still leaves numbers. A stage that
# fails or is cut does not stop the later ones. Each cap can be set by its variable (ENV_TIMEOUT,
# BUILD_TIMEOUT, INSTALL_TIMEOUT, TESTS_CUDA_TIMEOUT, TESTS_TRITON_TIMEOUT, TESTS_HEAVY_TIMEOUT,
# BENCH_TIMEOUT); `--print-caps` prints them and exits.
#
# Every command runs under `timeout` (SIGTERM at cap - 5 s, SIGKILL 5 s later). pytest runs with
# ROSE_TEST_TIMEOUT (tests/conftest.py: a test that runs past it fails and the next one runs; a
# SIGTERM ends the session with pytest's summary of the tests run so far), -rfEs, unbuffered, and
# --continue-on-collection-errors (a file that fails to import does not stop the others; no
# --maxfail either). summary.md is rewritten before and after every stage (exit code, time, key
# lines; the stage under way marked as such), so a kill at any point leaves the summary of the
# stages done and names the one it cut. Files in $OUT (default bench/results/device-<date>; at
# most 8 come back from the machine): env.txt, build.txt (build and install), tests.txt (the three
# test stages), bench.txt, gpu-step.md/.json (bench_gpu.py), summary.md. Set ROSE_GIT_REV to the
# revision (the copy has no .git), PYTHON to the interpreter (default python3).
#
#   ROSE_GIT_REV=$(git rev-parse --short HEAD) OUT=/tmp/out bash bench/device_check.sh
#
# --dry-run (or DEVICE_CHECK_DRY=1) runs every stage's command lines here, without a GPU, with CPU
# stand-ins: a line instead of nvidia-smi; setup.py evaluated with ROSE_KERNELS_CUDA=0 (`setup.py
# --version`: the extension it would build, no compile) and whether the in-place extension is up to
# date, never a build: `build_ext --inplace` rewrites the in-place .so even when it is up to date
# (setuptools copies it over from build/lib), under any process of this tree that has it loaded,
# and compiles everything where build/ is missing; pip install --dry-run;
# TRITON_INTERPRET=1 and a few tests for the test stages (the GPU-only ones skip); bench_gpu.py on
# the CPU on a tiny layout. tests/test_device_check.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

case ${DEVICE_CHECK_DRY:-0} in "" | 0) DRY=0 ;; *) DRY=1 ;; esac
PRINT_CAPS=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --print-caps) PRINT_CAPS=1 ;;
    -h | --help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (--dry-run, --print-caps, --help)" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------------------------------- caps (s)
ENV_TIMEOUT=${ENV_TIMEOUT:-30}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-100}
INSTALL_TIMEOUT=${INSTALL_TIMEOUT:-20}
TESTS_CUDA_TIMEOUT=${TESTS_CUDA_TIMEOUT:-40}
TESTS_TRITON_TIMEOUT=${TESTS_TRITON_TIMEOUT:-145}
TESTS_HEAVY_TIMEOUT=${TESTS_HEAVY_TIMEOUT:-70}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-75}
STAGES=(env build install tests-cuda tests-triton tests-heavy bench)
declare -A CAP=([env]=$ENV_TIMEOUT [build]=$BUILD_TIMEOUT [install]=$INSTALL_TIMEOUT
  [tests-cuda]=$TESTS_CUDA_TIMEOUT [tests-triton]=$TESTS_TRITON_TIMEOUT
  [tests-heavy]=$TESTS_HEAVY_TIMEOUT [bench]=$BENCH_TIMEOUT)
GRACE=5  # SIGTERM at cap - GRACE, SIGKILL at cap
# Inside tests-heavy: the sanitizer's own limit, below the stage's SIGTERM (cap - GRACE) by the ~25 s
# of the 2^31 test before it and pytest's start (~5 s), so that its "ran past" message, not the
# stage's kill, reports a slow sanitizer.
export ROSE_SANITIZER_TIMEOUT=${ROSE_SANITIZER_TIMEOUT:-$((TESTS_HEAVY_TIMEOUT - 35))}
# Per test (ROSE_TEST_TIMEOUT overrides all three): a hung test fails and the stage goes on.
declare -A PER_TEST=([tests-cuda]=${ROSE_TEST_TIMEOUT:-20} [tests-triton]=${ROSE_TEST_TIMEOUT:-75}
  [tests-heavy]=${ROSE_TEST_TIMEOUT:-$((TESTS_HEAVY_TIMEOUT - 10))})
TOTAL=0
for s in "${STAGES[@]}"; do TOTAL=$((TOTAL + CAP[$s])); done

if [ "$PRINT_CAPS" = 1 ]; then
  for s in "${STAGES[@]}"; do echo "cap $s ${CAP[$s]}"; done
  echo "total $TOTAL"
  echo "sanitizer $ROSE_SANITIZER_TIMEOUT"
  for s in tests-cuda tests-triton tests-heavy; do echo "per-test $s ${PER_TEST[$s]}"; done
  exit 0
fi

# ----------------------------------------------------------------------------------- environment
OUT=${OUT:-bench/results/device-$(date +%F)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PY DRY
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
command -v timeout > /dev/null || { echo "device_check.sh: needs coreutils' timeout" >&2; exit 2; }

# CUDA_HOME: the toolkit of the nvcc on the PATH (its directory's parent; where nvcc is a wrapper
# script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, the toolkit it runs), else /usr/local/cuda.
derive_cuda_home() {
  local nvcc home target
  nvcc=$(command -v nvcc) || { echo "/usr/local/cuda|nvcc not on the PATH: the default"; return; }
  home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  if [ ! -e "$home/include/cuda_runtime.h" ] && [ ! -d "$home/targets" ] && [ "$(head -c 2 "$nvcc")" = "#!" ]; then
    target=$(grep -o '/[^" ]*/bin/nvcc' "$nvcc" | head -1)
    [ -n "$target" ] && [ -x "$target" ] && { echo "$(dirname "$(dirname "$target")")|from $nvcc, a wrapper of $target"; return; }
  fi
  echo "$home|from $nvcc"
}
if [ -z "${CUDA_HOME:-}" ]; then
  found=$(derive_cuda_home)
  export CUDA_HOME=${found%%|*} CUDA_HOME_HOW=${found#*|}
else
  export CUDA_HOME CUDA_HOME_HOW="set by the caller"
fi

env_report() {
  date -Is
  if [ "$DRY" = 1 ]; then
    echo "mode: DRY RUN (CPU stand-ins: nothing here ran on or measured a GPU)"
    echo "nvidia-smi: dry run, no GPU here (on the device: name, memory.total, driver_version, clocks.max.sm, clocks.max.mem)"
  else
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
      --format=csv,noheader || echo "nvidia-smi failed (exit $?)"
  fi
  echo "CUDA_HOME=$CUDA_HOME ($CUDA_HOME_HOW)"
  if command -v nvcc > /dev/null; then echo "nvcc: $(timeout 10 nvcc --version | tail -1)"; else echo "nvcc: not on the PATH"; fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  "$PY" -c "
import re, sys
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f'not importable ({e})'
try:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
except Exception as e:
    dev = f'CUDA error ({e})'
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', tv, 'cuda', torch.version.cuda, dev)
try:
    import setuptools
except Exception as e:
    print('setuptools not importable:', e)
    print('WARNING: the build needs setuptools >= 72.2')
else:
    v = setuptools.__version__
    print('setuptools', v)
    if tuple(int(x) for x in re.findall(r'\d+', v)[:2]) < (72, 2):
        print('WARNING: setuptools', v, 'is older than 72.2: it compiles C++ with compiler_so, not compiler_so_cxx,'
              ' which the parallel compile in setup.py relies on')
"
  echo "git ${ROSE_GIT_REV:-unknown}"
  echo "$CAPS_LINE"
}

build_stage() {
  if [ "$DRY" = 0 ]; then
    ROSE_KERNELS_CUDA=1 "$PY" setup.py build_ext --inplace
    return
  fi
  # Dry run: setup.py evaluated (the extension it would build), no compile, nothing written.
  local so stale
  ROSE_KERNELS_CUDA=0 "$PY" setup.py --version || return
  so=$(ls rose_kernels/_C*.so 2> /dev/null | head -1)
  if [ -z "$so" ]; then
    stale="no rose_kernels/_C*.so"
  else
    stale=$(find csrc -maxdepth 1 \( -name '*.cpp' -o -name '*.h' \) -newer "$so"
      find csrc/cpu \( -name '*.cpp' -o -name '*.h' \) -newer "$so")
  fi
  # shellcheck disable=SC2086  # $stale: one line of file names
  echo "dry run: stand-in for 'ROSE_KERNELS_CUDA=1 $PY setup.py build_ext --inplace' (no compile here; make" \
    "build builds): the in-place CPU extension is $([ -n "$stale" ] && echo "not up to date ($(echo $stale | head -c 200))" || echo "up to date")"
}

install_stage() {
  "$PY" -c "import rose_kernels.ops as o; print('extension:', o.available(), 'cuda kernels:', o.built_with_cuda(), o.EXTENSION_ERROR or '')"
  local dry_flag=()
  [ "$DRY" = 1 ] && dry_flag=(--dry-run)
  ROSE_KERNELS_NO_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index "${dry_flag[@]}" -e . \
    || { echo "install failed (exit $?); the tests and the bench run from the source tree (PYTHONPATH)"; return 1; }
  echo "installed editable${dry_flag:+ (pip --dry-run)}"
}
export -f env_report build_stage install_stage
CAPS_LINE="caps: $(for s in "${STAGES[@]}"; do printf '%s %s, ' "$s" "${CAP[$s]}"; done)total $TOTAL s;"
export CAPS_LINE="$CAPS_LINE sanitizer $ROSE_SANITIZER_TIMEOUT s"  # (bash cannot export arrays)

# ------------------------------------------------------------------------------------- the stages
echo "stage rc secs cap log ok" > "$WORK/stages"

key_lines() {  # NAME RC: the lines of a stage's log that summary.md shows
  local name=$1 rc=$2 log="$WORK/$1.log" key
  key=$(stage_lines "$name" "$rc")
  [ -n "$key" ] && echo "$key"
  case $rc in
    124 | 137)
      echo "(cut at its cap of ${CAP[$name]} s; the log's last lines:)"
      tail -6 "$log" | grep -vxF -e "$key" ;;
  esac
  return 0
}

stage_lines() {
  local name=$1 rc=$2 log="$WORK/$1.log"
  case $name in
    env) ;;  # env.txt is shown whole
    build)
      grep -E "^rose_kernels: building|^dry run:" "$log" | head -3
      [ "$rc" != 0 ] && grep -iE "error" "$log" | head -20 ;;
    install) grep -E "^extension:|^installed|install failed|^ERROR" "$log" | head -10 ;;
    tests-*)
      grep -E "^(FAILED|ERROR) |ran past|KeyboardInterrupt|^=+ .* in [0-9.]+s" "$log" | head -40
      grep -E "^SKIPPED" "$log" | head -10 ;;
    bench) [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ] && tail -15 "$log" ;;
  esac
  return 0
}

write_summary() {
  local done s row rc secs cap log ok  # (local: run_stage, which calls it, has its own cap, log, ok)
  done=$(($(wc -l < "$WORK/stages") - 1))
  {
    echo "# Device check $(date -Is)$([ "$DRY" = 1 ] && echo ' (DRY RUN: CPU stand-ins, no GPU)')"
    echo
    echo "git ${ROSE_GIT_REV:-unknown}; $done of ${#STAGES[@]} stages done; caps $TOTAL s in all."
    echo
    echo "| stage | exit | time | cap | log |"
    echo "|---|---|---|---|---|"
    for s in "${STAGES[@]}"; do
      row=$(awk -v s="$s" '$1 == s' "$WORK/stages")
      if [ -n "$row" ]; then
        read -r _ rc secs cap log ok <<< "$row"
        echo "| $s | $rc$(rc_note "$rc" "$ok") | $secs s | $cap s | $log |"
      elif [ "$s" = "$RUNNING" ]; then
        echo "| $s | running since $RUNNING_SINCE (no exit code yet: cut here if this is the last summary) | | ${CAP[$s]} s | |"
      else
        echo "| $s | not run (yet) | | ${CAP[$s]} s | |"
      fi
    done
    echo
    if [ -f "$OUT/env.txt" ]; then echo '```'; cat "$OUT/env.txt"; echo '```'; echo; fi
    for s in "${STAGES[@]}"; do
      [ -s "$WORK/$s.key" ] || continue
      echo "## $s"; echo; echo '```'; cat "$WORK/$s.key"; echo '```'; echo
    done
    [ -f "$OUT/gpu-step.md" ] && cat "$OUT/gpu-step.md"
  } > "$OUT/summary.md"
}

rc_note() {  # RC OK: what an exit code means, for the summary
  case $1 in
    0) ;;
    124 | 137) echo " (cut at its cap)" ;;
    5) [ "$2" = 1 ] && echo " (no tests collected: accepted in the dry run)" || echo " (no tests collected)" ;;
    *) [ "$2" = 1 ] || echo " (failed)" ;;
  esac
}

ACCEPT="0"  # the exit codes that count as a pass (run_stage's caller may widen it for one stage)
RUNNING=""  # the stage under way, for the summary
run_stage() {  # NAME LOG CMD...: CMD under the stage's cap, its output appended to $OUT/LOG
  local name=$1 log=$2 cap=${CAP[$1]} start rc secs ok=0
  shift 2
  start=$(date +%s)
  RUNNING=$name RUNNING_SINCE=$(date +%T)
  write_summary
  : > "$WORK/$name.log"
  [ "$name" = env ] || echo "===== $name (cap $cap s): $(printf '%q ' "$@")=====" | tee -a "$OUT/$log"
  timeout -k "$GRACE" "$((cap - GRACE))" "$@" 2>&1 | tee -a "$OUT/$log" "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(($(date +%s) - start))
  case " $ACCEPT " in *" $rc "*) ok=1 ;; esac
  echo "$name: exit $rc in $secs s (cap $cap s)$(rc_note "$rc" "$ok")" | tee -a "$OUT/$log"
  echo "$name $rc $secs $cap $log $ok" >> "$WORK/stages"
  key_lines "$name" "$rc" > "$WORK/$name.key"
  RUNNING=""
  write_summary
}

pytest_stage() {  # NAME PYTEST-ARGS...
  local name=$1
  shift
  # Without a GPU, test_cuda.py skips as a module: tests-heavy then collects nothing and exits 5.
  [ "$DRY" = 1 ] && [ "$name" != tests-triton ] && ACCEPT="0 5"
  run_stage "$name" tests.txt env ROSE_TEST_TIMEOUT="${PER_TEST[$name]}" \
    "$PY" -u -m pytest -v -rfEs -p no:cacheprovider --continue-on-collection-errors "$@"
  ACCEPT="0"
}

write_summary
: > "$OUT/tests.txt"
: > "$OUT/build.txt"
run_stage env env.txt bash -c env_report
run_stage build build.txt bash -c build_stage
run_stage install build.txt bash -c install_stage

# The dry run keeps its test stages short: test_cuda.py skips as a module (no GPU), and two cheap
# whole-step tests stand for the tests-triton files.
DRY_K=()
[ "$DRY" = 1 ] && DRY_K=(-k "test_sumsq_mixed_dtypes or test_tensor_and_scheduled_float_lrs_together")
TRITON_FILES=(tests/test_triton.py tests/test_triton_host.py)
[ -f tests/test_devices.py ] && TRITON_FILES+=(tests/test_devices.py)
pytest_stage tests-cuda --durations=5 -m "not gpu_heavy" tests/test_cuda.py tests/test_op_family.py
pytest_stage tests-triton --durations=10 "${DRY_K[@]}" "${TRITON_FILES[@]}"
pytest_stage tests-heavy --durations=2 -m gpu_heavy tests/test_cuda.py

if [ "$DRY" = 1 ]; then
  BENCH=(--device cpu --layouts tiny --rounds 1 --select-elements 3000 --backends triton)
else
  BENCH=()
fi
# shellcheck disable=SC2086  # BENCH_ARGS: extra words on purpose
run_stage bench bench.txt "$PY" -u bench/bench_gpu.py "${BENCH[@]}" --out "$OUT" ${BENCH_ARGS:-}

write_summary
cat "$OUT/summary.md"
# The exit status: 1 when a stage other than install failed (without the editable install the tests
# and the bench still run from the source tree).
status=0
while read -r s _ _ _ _ ok; do
  [ "$s" = stage ] || [ "$s" = install ] || [ "$ok" = 1 ] || status=1
done < "$WORK/stages"
exit $status
