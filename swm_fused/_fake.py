"""Fake (meta) kernels of the ``torch.ops.swm_fused`` ops, so ``torch.compile`` can trace them.

Importing this module loads the compiled extension (raising ``ImportError`` when it is not
built) and registers the fake kernels once; the cpp and cuda backends import it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (defines the swm_fused ops)


@torch.library.register_fake("swm_fused::lerp_")
def _lerp_fake(avg: List[Tensor], src: List[Tensor], weight: float,
               weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    return None


@torch.library.register_fake("swm_fused::swag_")
def _swag_fake(mean: List[Tensor], sq_mean: List[Tensor], src: List[Tensor], weight: float,
               weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    return None


@torch.library.register_fake("swm_fused::merge_")
def _merge_fake(out: List[Tensor], inputs: List[Tensor], weights: List[float]) -> None:
    return None


@torch.library.register_fake("swm_fused::lerp_multi_")
def _lerp_multi_fake(avgs: List[Tensor], src: List[Tensor], weights: List[float], found_inf: Optional[Tensor]) -> None:
    return None


@torch.library.register_fake("swm_fused::any_nonfinite")
def _any_nonfinite_fake(tensors: List[Tensor]) -> Tensor:
    return tensors[0].new_empty((), dtype=torch.float32)


@torch.library.register_fake("swm_fused::sq_norm")
def _sq_norm_fake(tensors: List[Tensor], scale: List[Tensor]) -> Tensor:
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tensors[0].new_empty((), dtype=dtype)


@torch.library.register_fake("swm_fused::sam_ascent_")
def _sam_ascent_fake(params: List[Tensor], grads: List[Tensor], saved: List[Tensor], scale: Tensor, adaptive: bool,
                     found_inf: Optional[Tensor]) -> None:
    return None


@torch.library.register_fake("swm_fused::ties_merge_")
def _ties_merge_fake(out: List[Tensor], inputs: List[Tensor], weights: List[float], base: List[Tensor],
                     thresholds: Optional[Tensor], majority_sign: str, normalize: bool, scale: float,
                     task_vectors: bool) -> None:
    return None


@torch.library.register_fake("swm_fused::dare_drop_")
def _dare_drop_fake(deltas: List[Tensor], u: List[Tensor], keep_prob: List[Tensor], p: float, rescale: bool) -> None:
    return None
