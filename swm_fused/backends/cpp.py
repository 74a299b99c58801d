"""C++ CPU backend: the ``torch.ops.swm_fused`` kernels of csrc/cpu/.

Each op is one parallel region over the whole list of tensors (every core, one pass
over memory), with mixed dtypes per tensor. Primitives and semantics are those of
:mod:`swm_fused.backends.reference`; non-contiguous tensors take a slower, correct path.

The ops check their lists in C++ (csrc/validate.h) before any kernel runs, with the
contract's messages minus the public op's name: ``ValueError``/``TypeError`` such as
"avg has 3 tensors but src has 2". Hence ``VALIDATES_LISTS``, which tells
swm_fused/ops.py to skip its per-tensor Python checks. ``any_nonfinite`` skips tensors
that are not floating point.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import Tensor

NAME = "cpp"

try:
    from .. import _fake  # noqa: F401  (loads swm_fused._C and registers the fake kernels)
    _IMPORT_ERROR = ""
except ImportError as exc:
    _IMPORT_ERROR = f"extension not built: {exc}"

# The checks are BackendSelect kernels (csrc/cpu/checked_dispatch.cpp); asking for them
# keeps an extension built before they existed on the Python checks.
VALIDATES_LISTS = not _IMPORT_ERROR and torch._C._dispatch_has_kernel_for_dispatch_key(
    "swm_fused::lerp_", "BackendSelect")


def unavailable_reason() -> str:
    """"" when the compiled extension loaded, else why it did not."""
    return _IMPORT_ERROR


def supports(device: torch.device) -> bool:
    """The kernels run on CPU tensors only."""
    return device.type == "cpu"


def lerp_(avgs: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """avg <- lerp(avg, src, w), w = weight_tensor if given else weight; skipped when found_inf != 0."""
    torch.ops.swm_fused.lerp_(list(avgs), list(srcs), float(weight), weight_tensor, found_inf)


def swag_(means: Sequence[Tensor], sq_means: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """mean <- lerp(mean, src, w) and sq_mean <- lerp(sq_mean, src*src, w), in one pass."""
    torch.ops.swm_fused.swag_(list(means), list(sq_means), list(srcs), float(weight), weight_tensor, found_inf)


def merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> None:
    """out <- sum_k weights[k] * inputs[k][i]; ``out`` may be one of the inputs."""
    flat_inputs = list(itertools.chain.from_iterable(inputs))  # k-major, as the schema wants
    torch.ops.swm_fused.merge_(list(outs), flat_inputs, [float(w) for w in weights])


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim float32 tensor: 1.0 if any element of any tensor is NaN or Inf, else 0.0 (other dtypes skipped)."""
    return torch.ops.swm_fused.any_nonfinite(list(tensors))
