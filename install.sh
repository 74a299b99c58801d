#!/usr/bin/env bash
# Installs swm_fused with every extra into the current Python, building the C++ (and CUDA) kernels.
# Keeps an already-installed torch (e.g. a CUDA build); otherwise installs the CPU wheel torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q setuptools wheel ninja
"$PY" -m pip install -q --no-build-isolation -e ".[all]"
