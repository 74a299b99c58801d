#!/usr/bin/env bash
# Installs swm_fused with every extra into the current Python, building the C++ (and CUDA) kernels.
# Keeps an already-installed torch (e.g. a CUDA build); otherwise installs the CPU wheel torch==2.13.0.
# Every later install is constrained to that torch, so no dependency can swap it for another build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
"$PY" -m pip install -q -c "$constraints" setuptools wheel ninja
"$PY" -m pip install -q -c "$constraints" --no-build-isolation -e ".[all]"
# timm, for the side-by-side tests only: its torchvision dependency does not load beside a CPU torch, and the
# tests read timm's ModelEmaV3 source without importing the timm package.
"$PY" -m pip install -q -c "$constraints" --no-deps "timm>=1.0"
