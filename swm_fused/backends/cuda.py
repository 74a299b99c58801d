"""CUDA backend: the multi-tensor-apply kernels of csrc/cuda/, as ``torch.ops.swm_fused`` ops.

One launch covers many tensors (chunked, 16-byte vector loads where aligned) with mixed
dtypes per tensor. ``found_inf`` and a tensor ``n_averaged`` are read on the device, so no
op synchronises with the host. Primitives and semantics are those of
:mod:`swm_fused.backends.reference`; non-contiguous tensors take a slower, correct path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

NAME = "cuda"

try:
    from .. import _fake  # noqa: F401  (loads swm_fused._C and registers the fake kernels)
    _IMPORT_ERROR = ""
except ImportError as exc:
    _IMPORT_ERROR = f"extension not built: {exc}"


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


def lerp_(avgs: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """avg <- lerp(avg, src, w), w = weight_tensor if given else weight; skipped when found_inf != 0."""
    torch.ops.swm_fused.lerp_(list(avgs), list(srcs), float(weight), weight_tensor, found_inf)


def swag_(means: Sequence[Tensor], sq_means: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """mean <- lerp(mean, src, w) and sq_mean <- lerp(sq_mean, src*src, w), in one pass."""
    torch.ops.swm_fused.swag_(list(means), list(sq_means), list(srcs), float(weight), weight_tensor, found_inf)


def merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> None:
    """out <- sum_k weights[k] * inputs[k][i]; ``out`` may be one of the inputs.

    Up to 8 inputs run in one launch per dtype group; more chain launches through a
    float32 (float64 for float64 outputs) accumulator the size of ``out``.
    """
    flat_inputs = [t for per_model in inputs for t in per_model]  # k-major, as the schema wants
    torch.ops.swm_fused.merge_(list(outs), flat_inputs, [float(w) for w in weights])


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim float32 tensor on the device: 1.0 if any element of any tensor is NaN or Inf, else 0.0."""
    return torch.ops.swm_fused.any_nonfinite(list(tensors))
