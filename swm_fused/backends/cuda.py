"""CUDA backend: the multi-tensor-apply kernels of csrc/cuda/, as ``torch.ops.swm_fused`` ops.

One launch covers many tensors (chunked, 16-byte vector loads where aligned) with mixed
dtypes per tensor. ``found_inf`` and a tensor ``n_averaged`` are read on the device, so no
op synchronises with the host. Primitives and semantics are those of
:mod:`swm_fused.backends.reference`; non-contiguous tensors take a slower, correct path.
"""
from __future__ import annotations

import torch

# The same torch.ops.swm_fused calls as the cpp backend: the dispatcher picks the CUDA
# kernels for CUDA tensors, after the same C++ list checks.
from .cpp import _IMPORT_ERROR, VALIDATES_LISTS, any_nonfinite, lerp_, merge_, swag_  # noqa: F401

NAME = "cuda"


def unavailable_reason() -> str:
    """"" when CUDA kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    try:
        has_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("swm_fused::lerp_", "CUDA")
    except RuntimeError as exc:  # the op itself is not registered
        return f"extension has no swm_fused ops: {exc}"
    if not has_kernels:
        return ("extension built without CUDA kernels (rebuild with a CUDA toolkit and a CUDA build of torch, "
                "without SWM_FUSED_NO_CUDA=1)")
    return ""


def supports(device: torch.device) -> bool:
    """The kernels run on CUDA tensors only."""
    return device.type == "cuda"
