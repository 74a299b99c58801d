"""The compiled kernels of csrc/ as ``torch.ops.swm_fused`` ops: cpp on CPU tensors, cuda on CUDA tensors.

torch.library picks the kernel from the tensors' device. In front of every kernel sits the
validator of csrc/validate.h (registered as BackendSelect kernels by csrc/checks.cpp), so a bad
call raises before anything is written. Primitives and semantics are those of
:mod:`swm_fused.backends.reference`.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import torch
from torch import Tensor

try:
    from .. import _fake  # noqa: F401  (loads swm_fused._C and registers the fake kernels)
    IMPORT_ERROR = ""
except ImportError as exc:
    IMPORT_ERROR = f"extension not built: {exc}"

# The ops with device kernels (the check_* ops have one kernel for every device).
KERNEL_OPS = ("lerp_", "lerp_multi_", "swag_", "merge_", "any_nonfinite", "sq_norm", "sam_ascent_", "ties_merge_",
              "dare_drop_")


def has_kernels(dispatch_key: str) -> bool:
    """True when every kernel op has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::{op}", dispatch_key)
               for op in KERNEL_OPS)


def lerp_(avgs: List[Tensor], srcs: List[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """avg <- lerp(avg, src, w), w = weight_tensor if given else weight; skipped when found_inf != 0."""
    torch.ops.swm_fused.lerp_(avgs, srcs, weight, weight_tensor, found_inf)


def lerp_multi_(avgs: Sequence[List[Tensor]], srcs: List[Tensor], weights: List[float],
                found_inf: Optional[Tensor]) -> None:
    """avgs[k][i] <- lerp(avgs[k][i], src[i], weights[k]) for every k, reading each source once."""
    torch.ops.swm_fused.lerp_multi_(list(itertools.chain.from_iterable(avgs)), srcs, weights, found_inf)  # k-major


def swag_(means: List[Tensor], sq_means: List[Tensor], srcs: List[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """mean <- lerp(mean, src, w) and sq_mean <- lerp(sq_mean, src*src, w), in one pass."""
    torch.ops.swm_fused.swag_(means, sq_means, srcs, weight, weight_tensor, found_inf)


def merge_(outs: List[Tensor], inputs: Sequence[List[Tensor]], weights: List[float]) -> None:
    """out <- sum_k weights[k] * inputs[k][i]; ``out`` may be one of the inputs."""
    torch.ops.swm_fused.merge_(outs, list(itertools.chain.from_iterable(inputs)), weights)  # k-major


def any_nonfinite(tensors: List[Tensor]) -> Tensor:
    """0-dim float32 tensor: 1.0 if any element of any (floating) tensor is NaN or Inf, else 0.0."""
    return torch.ops.swm_fused.any_nonfinite(tensors)


def sq_norm(tensors: List[Tensor], scale: List[Tensor]) -> Tensor:
    """0-dim float32 tensor: sum over the tensors of (scale * t)^2 (``scale`` empty: no scale)."""
    return torch.ops.swm_fused.sq_norm(tensors, scale)


def sam_ascent_(params: List[Tensor], grads: List[Tensor], saved: List[Tensor], scale: Tensor, adaptive: bool,
                found_inf: Optional[Tensor]) -> None:
    """saved <- w; w <- w + ((w*w if adaptive else 1) * g) * scale, one pass; w unchanged when found_inf != 0."""
    torch.ops.swm_fused.sam_ascent_(params, grads, saved, scale, adaptive, found_inf)


def ties_merge_(outs: List[Tensor], inputs: Sequence[List[Tensor]], weights: List[float], base: List[Tensor],
                thresholds: Optional[Tensor], majority_sign: str, normalize: bool, scale: float,
                task_vectors: bool) -> None:
    """out <- base + scale * TIES(inputs): sign election, masked sum (and mean), one pass; see the reference."""
    torch.ops.swm_fused.ties_merge_(outs, list(itertools.chain.from_iterable(inputs)), weights, base, thresholds,
                                    majority_sign, normalize, scale, task_vectors)  # k-major


def dare_drop_(deltas: List[Tensor], u: List[Tensor], keep_prob: List[Tensor], p: float, rescale: bool) -> None:
    """delta <- [u < p] * (delta / p if rescale else delta), in place, one pass; p = keep_prob[i] or the number p."""
    torch.ops.swm_fused.dare_drop_(deltas, u, keep_prob, p, rescale)
