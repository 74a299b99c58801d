#!/usr/bin/env bash
# A full CUDA build of swm_fused in CI, without a GPU (issue 9, section 1):
#   1. resolve the real CUDA toolkit root (nvcc on PATH may be a wrapper script);
#   2. a throwaway virtual environment outside the repo with a CUDA build of torch
#      (SWM_FUSED_CI_TORCH, default torch==2.11.0: the CUDA 13.0 build, as on the GPU machine);
#   3. a copy of the working tree (tracked files plus untracked, not-ignored ones), so the repo's own
#      in-place CPU build (swm_fused/_C*.so) is never touched;
#   4. `setup.py build_ext --inplace` there with CUDA_HOME at the toolkit root, TORCH_CUDA_ARCH_LIST=9.0
#      (SWM_FUSED_CI_CUDA_ARCH_LIST) and MAX_JOBS=2 (MAX_JOBS);
#   5. import it in that environment (no GPU needed) and require that every swm_fused op with a CPU
#      kernel also has a CUDA kernel registered (and that there is at least one such op);
#   6. `python -m swm_fused info` must exit 0.
# Any compile, link, import or registration error exits non-zero. Skips (exit 0) only when nvcc is absent.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$(pwd)

say() { echo "cuda_build_check: $*"; }
die() { say "FAILED: $*"; exit 1; }

# Phase timings: start_phase NAME ... end_phase; the summary is printed on every exit.
phase_names=()
phase_secs=()
phase_name=""
phase_t0=""
start_phase() { phase_name=$1; phase_t0=$EPOCHREALTIME; say "== $phase_name"; }
end_phase() {
  local secs
  secs=$(awk -v a="$phase_t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  phase_names+=("$phase_name"); phase_secs+=("$secs")
  say "   $phase_name took ${secs}s"
  phase_name=""
}
total_t0=$EPOCHREALTIME
work=""
finish() {
  local rc=$? i total
  if [ -n "$phase_name" ]; then end_phase; fi
  if [ -n "$work" ]; then
    phase_name="cleanup"; phase_t0=$EPOCHREALTIME
    rm -rf -- "$work"
    end_phase
  fi
  if [ ${#phase_names[@]} -gt 0 ]; then
    say "timings:"
    for i in "${!phase_names[@]}"; do
      printf 'cuda_build_check:   %-28s %7ss\n' "${phase_names[$i]}" "${phase_secs[$i]}"
    done
  fi
  total=$(awk -v a="$total_t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  say "total ${total}s, exit $rc"
}
trap finish EXIT

# 1. nvcc and the toolkit root ------------------------------------------------------------------
nvcc_bin=$(command -v nvcc || true)
for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if [ -z "$nvcc_bin" ] && [ -x "$candidate" ]; then nvcc_bin=$candidate; fi
done
if [ -z "$nvcc_bin" ]; then
  say "nvcc not found; skipping the CUDA build check"
  exit 0
fi

start_phase "resolve toolkit"
# A toolkit root holds the real nvcc and cuda_runtime.h. nvcc may be a wrapper script, so ask it where it
# lives (--dryrun prints TOP=<root> and its include dir), as .ci/nvcc_check.sh does for its headers.
dryrun=$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 || true)
dryrun_top=$(printf '%s\n' "$dryrun" | sed -n 's/^#\$ TOP=//p' | head -n 1)
dryrun_include=$(printf '%s\n' "$dryrun" | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
cuda_root=""
for candidate in "${CUDA_HOME:-}" "$dryrun_top" "$(dirname "$(readlink -f "$nvcc_bin")")/.." \
                 "${dryrun_include:+$dryrun_include/../../..}" /usr/local/cuda; do
  [ -n "$candidate" ] && [ -z "$cuda_root" ] || continue
  candidate=$(readlink -f "$candidate" 2>/dev/null) || continue
  if [ -x "$candidate/bin/nvcc" ] && { [ -f "$candidate/include/cuda_runtime.h" ] ||
                                       [ -f "$candidate/targets/x86_64-linux/include/cuda_runtime.h" ]; }; then
    cuda_root=$candidate
  fi
done
[ -n "$cuda_root" ] || die "no CUDA toolkit root for $nvcc_bin (tried CUDA_HOME, nvcc --dryrun's TOP, its real path)"
say "nvcc $nvcc_bin -> toolkit root $cuda_root ($("$cuda_root/bin/nvcc" --version | grep -o 'release .*' | head -n 1))"
end_phase

# 2. throwaway environment with a CUDA torch -------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/swm_fused_cuda_build.XXXXXX") || die "mktemp failed"
case "$work" in "$repo"|"$repo"/*) die "temporary directory $work is inside the repo";; esac
venv=${SWM_FUSED_CI_VENV:-$work/venv}  # SWM_FUSED_CI_VENV: reuse a prepared venv (local iteration; kept)
src=$work/src
py=$venv/bin/python
torch_req=${SWM_FUSED_CI_TORCH:-torch==2.11.0}

if [ -n "${SWM_FUSED_CI_VENV:-}" ]; then
  start_phase "reuse venv $venv"
  [ -x "$py" ] || die "SWM_FUSED_CI_VENV=$venv has no bin/python"
else
  start_phase "venv + $torch_req"
  "${PYTHON:-python3}" -m venv "$venv" || die "python -m venv failed"
  if ! "$py" -m pip install -q --no-compile --progress-bar off "$torch_req" setuptools wheel ninja numpy \
       >"$work/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$work/pip.log" | tail -n 40
    die "pip install $torch_req failed"
  fi
fi
torch_info=$("$py" -c "import torch; print(torch.__version__, torch.version.cuda)") || die "torch does not import"
say "venv torch: $torch_info"
case "$torch_info" in *" None") die "$torch_req is not a CUDA build of torch ($torch_info)";; esac
end_phase

# 3. a copy of the working tree ----------------------------------------------------------------------
start_phase "copy working tree"
mkdir -p "$src"
# Tracked files (as they are now, edits included) plus untracked files that are not ignored; skip tracked
# files deleted in the working tree. Ignored build outputs (the CPU _C*.so, build/) stay behind.
git -C "$repo" ls-files -z -co --exclude-standard --deduplicate |
  while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done |
  tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf - || die "copying the working tree to $src failed"
say "copied $(find "$src" -type f | wc -l) files to $src"
end_phase

# 4. the CUDA build ---------------------------------------------------------------------------------
start_phase "build (nvcc + c++)"
export CUDA_HOME=$cuda_root
export TORCH_CUDA_ARCH_LIST=${SWM_FUSED_CI_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
unset SWM_FUSED_NO_EXT SWM_FUSED_NO_CUDA
say "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
if ! (cd "$src" && PATH="$venv/bin:$cuda_root/bin:$PATH" "$py" setup.py -q build_ext --inplace) \
     >"$work/build.log" 2>&1; then
  say "build errors (first 40 lines that mention one):"
  grep -E "error|FAILED:" "$work/build.log" | grep -vE '^ *(File|raise|\^)' | head -n 40
  say "end of the build log:"
  tail -n 30 "$work/build.log"
  die "the CUDA build failed (log above)"
fi
say "build log: $(wc -l <"$work/build.log") lines, $(grep -ci "warning" "$work/build.log") mentioning warnings"
so=$(find "$src/swm_fused" -maxdepth 1 -name "_C*.so" | head -n 1)
[ -n "$so" ] || { tail -n 40 "$work/build.log"; die "the build produced no swm_fused/_C*.so"; }
say "built $(basename "$so") ($(du -h "$so" | cut -f1))"
end_phase

# 5. import and kernel registration -----------------------------------------------------------------
start_phase "import + registration"
# Run outside $src and the repo, with only the copy on the path: the repo's editable CPU install must not answer.
if ! (cd "$work" && PYTHONPATH="$src" "$py" - "$src" <<'EOF'
import pathlib
import sys

import torch

import swm_fused
import swm_fused._C  # noqa: F401  (the static kernel registrations)

src = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(swm_fused._C.__file__).resolve()
if src not in where.parents:
    sys.exit(f"imported swm_fused._C from {where}, not from the CUDA build in {src}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}, "
      f"swm_fused._C from {where}")
print("available backends:", ", ".join(swm_fused.available_backends()))  # imports every backend module

ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("swm_fused::"))
missing, cpu_ops = [], []
for name in ops:
    keys = [k for k in ("CPU", "CUDA", "CompositeImplicitAutograd", "CompositeExplicitAutograd", "BackendSelect",
                        "Meta") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
    print(f"  {name:<36} {' '.join(keys) or '(no kernels)'}")
    if "CPU" in keys:
        cpu_ops.append(name)
        if "CUDA" not in keys:
            missing.append(name)
if not cpu_ops:
    sys.exit(f"no swm_fused op has a CPU kernel ({len(ops)} swm_fused ops registered): the extension did not load")
if missing:
    sys.exit(f"{len(missing)} of {len(cpu_ops)} ops with a CPU kernel have no CUDA kernel: {', '.join(missing)}")
print(f"all {len(cpu_ops)} ops with a CPU kernel have a CUDA kernel ({len(ops)} swm_fused ops in all)")
EOF
); then
  die "import or kernel registration check failed"
fi
end_phase

# 6. python -m swm_fused info -------------------------------------------------------------------------
start_phase "python -m swm_fused info"
(cd "$work" && PYTHONPATH="$src" "$py" -m swm_fused info) || die "python -m swm_fused info exited non-zero"
end_phase

say "OK: swm_fused builds with CUDA ($torch_info, arch $TORCH_CUDA_ARCH_LIST), imports without a GPU," \
    "and every op with a CPU kernel has a CUDA kernel"
