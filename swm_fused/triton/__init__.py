"""Triton backend: one kernel launch per dtype group for a whole list of tensors.

Each op reaches every tensor of a list through an int64 table of addresses and
sizes (see ``_multi_tensor``), so a list of 5,000 tensors costs one launch per
combination of dtypes, not 5,000. Arithmetic follows the reference backend:
float32 (float64 for float64 averages), torch's fma lerp, one rounding at the
store; ``weight_tensor`` and ``found_inf`` are read on the device.

Runs on CUDA tensors, or on CPU tensors when the kernels were decorated under
``TRITON_INTERPRET=1`` (set it before importing this package).
"""
from __future__ import annotations

import torch

NAME = "triton"

try:
    import triton  # noqa: F401  (probe: everything below needs it)
except ImportError as exc:
    _IMPORT_ERROR = f"triton not installed: {exc}"
else:
    _IMPORT_ERROR = ""
    from ._multi_tensor import INTERPRETED
    from .any_nonfinite import any_nonfinite
    from .lerp import lerp_
    from .merge import merge_
    from .swag import swag_


def unavailable_reason() -> str:
    """Empty when this backend can run here, else the reason it cannot."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not INTERPRETED and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    return ""


def supports(device: torch.device) -> bool:
    """CUDA tensors; CPU tensors instead when running under the Triton interpreter."""
    if _IMPORT_ERROR:
        return False
    return torch.device(device).type == ("cpu" if INTERPRETED else "cuda")
