#!/usr/bin/env bash
# Compile-check the CUDA backend without a GPU or a CUDA build of torch:
#   1. every csrc/cuda/*.cu with nvcc, with the flags torch's BuildExtension adds to every .cu;
#   2. csrc/cuda/bindings.cpp for syntax against the installed torch's headers (which ship c10/cuda),
#      when torch imports and a host C++ compiler is found.
# Skips (exit 0) with a message when nvcc is absent; exits 1 when any compile fails.
# SWM_FUSED_NVCC_ARCHS picks the targets (default "sm_90"; e.g. "sm_80 sm_90").
set -uo pipefail
cd "$(dirname "$0")/.."

nvcc_bin=$(command -v nvcc || true)
for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if [ -z "$nvcc_bin" ] && [ -x "$candidate" ]; then nvcc_bin=$candidate; fi
done
if [ -z "$nvcc_bin" ]; then
  echo "nvcc_check: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
# The toolkit's headers (for bindings.cpp): nvcc may be a wrapper script, so ask it where they are.
cuda_include=""
dryrun_include=$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
for candidate in "${CUDA_HOME:-}/include" "$dryrun_include" "$(dirname "$(readlink -f "$nvcc_bin")")/../include" \
                 /usr/local/cuda/include; do
  if [ -z "$cuda_include" ] && [ -f "$candidate/cuda_runtime.h" ]; then cuda_include=$candidate; fi
done
archs=${SWM_FUSED_NVCC_ARCHS:-sm_90}
torch_nvcc_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
out_dir=$(mktemp -d)
trap 'rm -rf "$out_dir"' EXIT

echo "nvcc_check: $("$nvcc_bin" --version | tail -n 1)"
failed=()
for arch in $archs; do
  for source in csrc/cuda/*.cu; do
    cmd=("$nvcc_bin" -c "-arch=$arch" -std=c++17 -O3 "${torch_nvcc_flags[@]}" -o "$out_dir/$(basename "$source").$arch.o" "$source")
    echo "nvcc_check: ${cmd[*]}"
    if ! "${cmd[@]}"; then failed+=("$source ($arch)"); fi
  done
done

if torch_includes=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))" 2>/dev/null); then
  cxx=${CXX:-$(command -v g++ || command -v c++ || true)}
  if [ -z "$cuda_include" ]; then
    echo "nvcc_check: cuda_runtime.h not found; skipping the bindings.cpp syntax check"
  elif [ -n "$cxx" ]; then
    # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; it only matters for Windows DLL exports.
    cmd=("$cxx" -fsyntax-only -std=c++17 -Wall -Wextra -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
    for dir in $torch_includes "$cuda_include"; do cmd+=(-isystem "$dir"); done
    cmd+=(-Icsrc csrc/cuda/bindings.cpp)
    echo "nvcc_check: ${cmd[*]}"
    if ! "${cmd[@]}"; then failed+=("csrc/cuda/bindings.cpp (syntax)"); fi
  else
    echo "nvcc_check: no host C++ compiler; skipping the bindings.cpp syntax check"
  fi
else
  echo "nvcc_check: torch does not import; skipping the bindings.cpp syntax check"
fi

if [ ${#failed[@]} -gt 0 ]; then
  printf 'nvcc_check: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "nvcc_check: all CUDA sources compiled (targets: $archs)"
