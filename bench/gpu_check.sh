#!/usr/bin/env bash
# One-shot device check for a GPU machine (issue 9, section 5), in at most 8 minutes:
#
#   bash bench/gpu_check.sh OUT_DIR [--dry-run]
#
# Phases, each with a wall-clock budget (a phase that fails or times out is recorded, and the next runs):
#   versions   date, GPU, driver, torch, Triton, CUDA, nvcc, compute-sanitizer
#   build      the CUDA extension in place (setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16),
#              then: every swm_fused op with a CPU kernel has a CUDA kernel
#   tests      $TEST_FILES with pytest on the GPU, Triton compiled (TRITON_INTERPRET is unset); figures the
#              tests record (record_property("gpu_figure", ...): the CUDA-graph update) go into the summary
#   sanitizer  compute-sanitizer --tool memcheck over bench/sanitize_ops.py (every op, cuda then triton)
#   bench      bench/gpu.py --out OUT_DIR/gpu-<date>.md (the copy ceiling is measured in the same run)
# Writes OUT_DIR/gpu_check-<date>.md (versions, each phase's status and duration, test counts) and
# OUT_DIR/gpu_check-<date>.log (everything printed). Exit 0 when no phase failed.
#
# --dry-run checks the script itself on a CPU machine (CI runs it from bench/test_gpu_check.py): no CUDA build
# (the existing CPU build is used), $DRY_RUN_TEST_FILES only, sanitize_ops.py --device cpu without the
# sanitizer, and gpu.py --device cpu --quick on a few cases. Its numbers mean nothing.
#
# Knobs (environment): PYTHON (default python3), GPU_CHECK_TEST_FILES (default below), GPU_CHECK_TOTAL_S,
# GPU_CHECK_BENCH_BUDGET (gpu.py --budget), GPU_CHECK_MAX_JOBS (build jobs), GPU_CHECK_DRY_RUN_CASES.
# Needs no network.
set -uo pipefail

# test_cuda_graph.py first: its figure (issue 10) is measured even if the phase runs out of time later
DEFAULT_TEST_FILES="tests/test_cuda_graph.py tests/test_cuda.py tests/test_no_sync.py tests/test_ops.py tests/test_triton.py tests/test_compile.py tests/test_dispatch.py"
TEST_FILES=${GPU_CHECK_TEST_FILES:-$DEFAULT_TEST_FILES}
DRY_RUN_TEST_FILES="tests/test_dispatch.py"
DRY_RUN_BENCH_CASES=${GPU_CHECK_DRY_RUN_CASES-gpt2-bf16}  # gpu.py -k in a dry run (empty: every case)
PHASES=(versions build tests sanitizer bench)
TOTAL_BUDGET_S=${GPU_CHECK_TOTAL_S:-460}  # the whole check; each phase's timeout is clipped to what is left
declare -A BUDGET_S=([versions]=30 [build]=150 [tests]=150 [sanitizer]=90 [bench]=180)
# Seconds kept back for the phases after a phase, so that a slow phase cannot starve all of them.
declare -A RESERVE_AFTER_S=([versions]=0 [build]=220 [tests]=150 [sanitizer]=110 [bench]=0)
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET:-0.3}  # gpu.py --budget: seconds of timed calls per provider
BUILD_JOBS=${GPU_CHECK_MAX_JOBS:-16}
TEST_TIMEOUT_S=90                            # per test, when pytest-timeout is installed

usage() { echo "usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
out_dir=""
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage ;;
    *) [ -z "$out_dir" ] || usage; out_dir=$arg ;;
  esac
done
[ -n "$out_dir" ] || usage
mkdir -p "$out_dir" || { echo "gpu_check: cannot create $out_dir" >&2; exit 2; }
out_dir=$(cd "$out_dir" && pwd)
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)

stamp=$(date +%F)
log=$out_dir/gpu_check-$stamp.log
summary=$out_dir/gpu_check-$stamp.md
bench_md=$out_dir/gpu-$stamp.md
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf -- "$scratch"' EXIT
figures_file=$scratch/figures.md  # tests' recorded figures (bench/junit_summary.py), for the summary
: >"$log"
exec > >(tee -a "$log") 2>&1

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then  # the interpreter that has torch, if python3 is not it
  for candidate in python python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; break; fi
  done
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's swm_fused (and its in-place _C), first
unset TRITON_INTERPRET                               # compiled Triton on the GPU; conftest sets it on CPU itself
if [ "$dry_run" = 1 ]; then
  mode="dry run (CPU)"
  test_files=$DRY_RUN_TEST_FILES
else
  mode="full (GPU)"
  test_files=$TEST_FILES
fi

say() { echo "gpu_check: $*"; }
t_start=$EPOCHREALTIME
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

declare -A STATUS=() SECS=() DETAIL=()
phase=""
phase_t0=""
phase_timeout=0
# begin_phase NAME: sets phase_timeout (seconds); returns 1 when there is no time left for it.
begin_phase() {
  phase=$1
  phase_t0=$EPOCHREALTIME
  local left
  left=$(awk -v a="$t_start" -v b="$EPOCHREALTIME" -v total="$TOTAL_BUDGET_S" -v keep="${RESERVE_AFTER_S[$1]}" \
    'BEGIN { printf "%d", total - (b - a) - keep }')
  phase_timeout=${BUDGET_S[$1]}
  if [ "$left" -lt "$phase_timeout" ]; then phase_timeout=$left; fi
  echo
  say "===== $phase (timeout ${phase_timeout}s) ===== $(date +%T)"
  if [ "$phase_timeout" -lt 10 ]; then
    end_phase "not run" "no time left in the ${TOTAL_BUDGET_S}s budget"
    return 1
  fi
}
end_phase() {  # end_phase STATUS DETAIL
  STATUS[$phase]=$1
  DETAIL[$phase]=$2
  SECS[$phase]=$(elapsed "$phase_t0")
  say "----- $phase: $1 (${SECS[$phase]}s)${2:+: $2}"
}
# run_limited CMD...: runs CMD under the phase's timeout; returns its status (124: timed out). The signal is
# $limit_signal (TERM; the tests use INT, so that pytest still writes its report), then KILL 15 s later.
limit_signal=TERM
run_limited() { timeout --signal="$limit_signal" --kill-after=15 "$phase_timeout" "$@"; }
rc_text() {
  if [ "$1" = 124 ] || [ "$1" = 137 ]; then echo "timed out after ${phase_timeout}s"; else echo "exit $1"; fi
}

cuda_root() {  # the real toolkit root (nvcc may be a wrapper script), as .ci/cuda_build_check.sh finds it
  local nvcc_bin dryrun top candidate
  nvcc_bin=$(command -v nvcc || true)
  for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -z "$nvcc_bin" ] && [ -x "$candidate" ]; then nvcc_bin=$candidate; fi
  done
  [ -n "$nvcc_bin" ] || return 1
  dryrun=$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 || true)
  top=$(printf '%s\n' "$dryrun" | sed -n 's/^#\$ TOP=//p' | head -n 1)
  for candidate in "${CUDA_HOME:-}" "$top" "$(dirname "$(readlink -f "$nvcc_bin")")/.." /usr/local/cuda; do
    [ -n "$candidate" ] || continue
    candidate=$(readlink -f "$candidate" 2>/dev/null) || continue
    if [ -x "$candidate/bin/nvcc" ] && { [ -f "$candidate/include/cuda_runtime.h" ] ||
                                         [ -f "$candidate/targets/x86_64-linux/include/cuda_runtime.h" ]; }; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
find_sanitizer() {  # compute-sanitizer on PATH, else under the CUDA toolkit
  local candidate root
  if command -v compute-sanitizer; then return 0; fi
  root=$(cuda_root 2>/dev/null || true)
  root=${root:-/nonexistent}
  for candidate in "$root/bin/compute-sanitizer" "$root/compute-sanitizer/compute-sanitizer" \
                   /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

say "mode: $mode; output: $out_dir; log: $log"
say "command: bash bench/gpu_check.sh $*"

# ---- versions -------------------------------------------------------------------------------------
versions_file=$scratch/versions
if begin_phase versions; then
  {
    echo "date|$(date -Is)"
    echo "host|$(hostname 2>/dev/null || echo unknown), $(nproc) CPU cores"
    if command -v nvidia-smi >/dev/null 2>&1; then
      gpu=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 |
            paste -sd ';' -)
      echo "GPU (nvidia-smi: name, driver, memory)|${gpu:-nvidia-smi printed nothing}"
    else
      echo "GPU (nvidia-smi: name, driver, memory)|nvidia-smi not found"
    fi
    run_limited "$PY" - <<'EOF' 2>&1 || echo "python|torch does not import"
import platform
import torch
print(f"python|{platform.python_version()}")
print(f"torch|{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch device|{p.name}, sm_{p.major}{p.minor}, {p.total_memory >> 30} GiB, "
          f"{torch.cuda.device_count()} visible")
else:
    print("torch device|no CUDA device visible")
try:
    import triton
    print(f"triton|{triton.__version__}")
except ImportError as exc:
    print(f"triton|not installed ({exc})")
import shutil
try:
    import setuptools
    build_tools = f"setuptools {setuptools.__version__}"
except ImportError:
    build_tools = "setuptools MISSING (the build needs it)"
ninja = shutil.which("ninja")
build_tools += f", ninja {ninja or 'not on PATH (the build then compiles one file at a time)'}"
print(f"build tools|{build_tools}")
EOF
    nvcc_bin=$(command -v nvcc || true)
    if [ -n "$nvcc_bin" ]; then
      echo "nvcc|$("$nvcc_bin" --version | grep -o 'release .*' | head -n 1) ($nvcc_bin)"
    else
      echo "nvcc|not found"
    fi
    sanitizer_bin=$(find_sanitizer || true)
    if [ -n "$sanitizer_bin" ]; then
      echo "compute-sanitizer|$("$sanitizer_bin" --version 2>&1 | grep -iE 'version' | tail -n 1) ($sanitizer_bin)"
    else
      echo "compute-sanitizer|not found"
    fi
  } >"$versions_file"
  sed 's/|/: /' "$versions_file"
  end_phase ok ""
fi

# ---- build ----------------------------------------------------------------------------------------
registration_check() {  # every swm_fused op with a CPU kernel must have a CUDA kernel (REQUIRE_CUDA=0: report only)
  run_limited "$PY" - <<'EOF'
import os
import sys

import torch

import swm_fused
import swm_fused._C  # noqa: F401  (the kernel registrations)

print(f"swm_fused._C: {swm_fused._C.__file__}; backends: {', '.join(swm_fused.available_backends())}")
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("swm_fused::"))
cpu = [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
missing = [n for n in cpu if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"{len(ops)} swm_fused ops, {len(cpu)} with a CPU kernel, {len(cpu) - len(missing)} of those with a CUDA kernel"
      + (f"; no CUDA kernel: {', '.join(missing)}" if missing else ""))
if os.environ.get("REQUIRE_CUDA") == "1" and (missing or not cpu):
    sys.exit(1)
EOF
}
cuda_home=""
if begin_phase build; then
  if [ "$dry_run" = 1 ]; then
    say "dry run: no CUDA build; the existing CPU build of swm_fused._C is used"
    if registration_check; then
      end_phase skipped "dry run: existing CPU build used"
    else
      end_phase FAIL "dry run: swm_fused._C does not import (build it with install.sh)"
    fi
  elif ! cuda_home=$(cuda_root); then
    end_phase FAIL "no CUDA toolkit found (nvcc, CUDA_HOME)"
  else
    say "CUDA_HOME=$cuda_home TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$BUILD_JOBS"
    CUDA_HOME=$cuda_home TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$BUILD_JOBS SWM_FUSED_NO_EXT="" SWM_FUSED_NO_CUDA="" \
      PATH="$cuda_home/bin:$PATH" run_limited "$PY" setup.py build_ext --inplace
    rc=$?
    if [ "$rc" != 0 ]; then
      end_phase FAIL "setup.py build_ext: $(rc_text "$rc")"
    elif ! check_out=$(REQUIRE_CUDA=1 registration_check 2>&1); then
      echo "$check_out"
      end_phase FAIL "built, but: $(echo "$check_out" | tail -n 1)"
    else
      echo "$check_out"
      end_phase ok "$(echo "$check_out" | tail -n 1)"
    fi
  fi
fi

# ---- tests ----------------------------------------------------------------------------------------
if begin_phase tests; then
  junit=$scratch/junit.xml
  read -r -a test_args <<<"$test_files"
  pytest_args=(-q -rs -p no:cacheprovider --junitxml="$junit")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout="$TEST_TIMEOUT_S"); fi
  # GPU machines have 16 cores: spread the (many CPU-row) tests over workers when pytest-xdist is there
  if [ "$dry_run" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then pytest_args+=(-n 6); fi
  say "$PY -m pytest ${test_args[*]} ${pytest_args[*]}"
  limit_signal=INT run_limited "$PY" -m pytest "${test_args[@]}" "${pytest_args[@]}"
  rc=$?
  counts=$("$PY" bench/junit_summary.py "$junit" counts 2>/dev/null) || counts="no counts (no junit report)"
  "$PY" bench/junit_summary.py "$junit" figures >"$figures_file" 2>/dev/null || : >"$figures_file"
  if [ "$rc" = 0 ]; then
    end_phase ok "$counts ($test_files)"
  else
    end_phase FAIL "$counts; pytest $(rc_text "$rc") ($test_files)"
  fi
fi

# ---- sanitizer --------------------------------------------------------------------------------------
if begin_phase sanitizer; then
  sanitizer_log=$scratch/sanitizer.log
  if [ "$dry_run" = 1 ]; then
    say "dry run: bench/sanitize_ops.py --device cpu, without compute-sanitizer"
    run_limited "$PY" bench/sanitize_ops.py --device cpu 2>&1 | tee "$sanitizer_log"
    rc=${PIPESTATUS[0]}
    calls=$(grep "^sanitize_ops: .* calls" "$sanitizer_log" | tail -n 1)
    if [ "$rc" = 0 ]; then end_phase ok "dry run, no sanitizer: ${calls#sanitize_ops: }"
    else end_phase FAIL "dry run: sanitize_ops.py $(rc_text "$rc")${calls:+: ${calls#sanitize_ops: }}"; fi
  else
    sanitizer=$(find_sanitizer || true)
    if [ -z "$sanitizer" ]; then
      end_phase unavailable "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"
    else
      say "$("$sanitizer" --version 2>&1 | tail -n 1)"
      # Without the caching allocator every tensor is its own allocation, so memcheck sees reads past its end.
      # API errors are left to the script (a failed launch raises there); memcheck reports memory accesses.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_limited "$sanitizer" --tool memcheck --report-api-errors no \
        --error-exitcode 3 --print-limit 20 "$PY" bench/sanitize_ops.py --device cuda 2>&1 | tee "$sanitizer_log"
      rc=${PIPESTATUS[0]}
      calls=$(grep "^sanitize_ops: .* calls" "$sanitizer_log" | tail -n 1)
      # The tool's own refusals (no script output at all): not a failure of swm_fused, recorded as unavailable.
      refusal="not supported|unsupported|no supported device|unable to|refus|permission|failed to (initialize|attach|launch)"
      errors=$(grep -E "ERROR SUMMARY: [0-9]+ error" "$sanitizer_log" | tail -n 1 | sed 's/^=* *//')
      detail="memcheck ${errors:-(no error summary)}${calls:+; ${calls#sanitize_ops: }}"
      if [ "$rc" = 0 ]; then
        end_phase ok "$detail"
      elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        end_phase FAIL "$(rc_text "$rc"); $detail"
      elif [ -z "$calls" ] && grep -qiE "$refusal" "$sanitizer_log"; then
        why=$(grep -iE "$refusal" "$sanitizer_log" |
              head -n 1 | sed 's/^=* *//' | cut -c1-200)
        end_phase unavailable "compute-sanitizer did not run the script: $why"
      else
        end_phase FAIL "$(rc_text "$rc"); $detail"
      fi
    fi
  fi
fi

# ---- bench ------------------------------------------------------------------------------------------
if begin_phase bench; then
  if [ "$dry_run" = 1 ]; then
    # bench/test_bench_tools.py already dry-runs every case; here a few (every op) show the wiring works.
    bench_args=(--device cpu --quick --budget 0.001)
    read -r -a dry_cases <<<"$DRY_RUN_BENCH_CASES"
    if [ ${#dry_cases[@]} -gt 0 ]; then bench_args+=(-k "${dry_cases[@]}"); fi
  else
    bench_args=(--budget "$BENCH_BUDGET")
  fi
  rm -f "$bench_md"
  say "$PY bench/gpu.py ${bench_args[*]} --out $bench_md"
  run_limited "$PY" bench/gpu.py "${bench_args[@]}" --out "$bench_md" >"$scratch/bench.out"
  rc=$?
  ceiling=$(grep -m1 "copy ceiling" "$bench_md" 2>/dev/null | sed 's/^- *//; s/\*\*//g')
  measured=$(grep -c "measured in this run" "$bench_md" 2>/dev/null)
  not_run=$(awk '/^## / {on = /^## Not run/; next} on && /^\| / && !/^\| provider \|/ {n++} END {print n+0}' \
            "$bench_md" 2>/dev/null)
  if [ "$rc" = 0 ] && [ -s "$bench_md" ] && [ "${measured:-0}" -ge 1 ]; then
    end_phase ok "$(basename "$bench_md"); ${ceiling}; ${not_run:-0} 'not run' rows"
  elif [ "$rc" = 0 ]; then
    end_phase FAIL "gpu.py exited 0 but $(basename "$bench_md") has no copy ceiling measured in this run"
  else
    end_phase FAIL "gpu.py $(rc_text "$rc")"
  fi
fi

# ---- summary ----------------------------------------------------------------------------------------
overall=PASS
for p in "${PHASES[@]}"; do
  case "${STATUS[$p]:-not run}" in ok|skipped|unavailable) ;; *) overall=FAIL ;; esac
done
total=$(elapsed "$t_start")
{
  echo "# swm_fused GPU check, $stamp"
  echo
  echo "- mode: $mode"
  echo "- overall: **$overall** in ${total}s (budget ${TOTAL_BUDGET_S}s)"
  echo "- benchmark table: $(basename "$bench_md"); full log: $(basename "$log")"
  echo "- command: \`bash bench/gpu_check.sh $out_dir$([ "$dry_run" = 1 ] && echo " --dry-run")\`"
  echo
  echo "## Versions"
  echo
  echo "| item | value |"
  echo "|---|---|"
  if [ -s "$versions_file" ]; then
    sed 's/|/ | /; s/^/| /; s/$/ |/' "$versions_file"
  else
    echo "| (versions not recorded) | |"
  fi
  echo
  echo "## Figures the tests measured"
  echo
  if [ -s "$figures_file" ]; then cat "$figures_file"; else echo "(none recorded)"; fi
  echo
  echo "## Phases"
  echo
  echo "| phase | status | seconds | detail |"
  echo "|---|---|---:|---|"
  for p in "${PHASES[@]}"; do
    echo "| $p | ${STATUS[$p]:-not run} | ${SECS[$p]:-} | ${DETAIL[$p]:-} |"
  done
  echo
} >"$summary"
echo
cat "$summary"
say "summary: $summary"
[ "$overall" = PASS ]
