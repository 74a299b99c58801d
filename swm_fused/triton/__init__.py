"""Triton backend: one kernel launch per dtype group for a whole list of tensors.

Each op reaches every tensor of a list through an int64 table of addresses and
sizes (see ``_multi_tensor``), so a list of 5,000 tensors costs one launch per
combination of dtypes, not 5,000. Arithmetic follows the reference backend:
float32 (float64 for float64 averages), torch's fma lerp, one rounding at the
store; ``weight_tensor`` and ``found_inf`` are read on the device.

The launchers are registered as ``torch.ops.swm_fused_triton`` custom ops, so
``torch.compile`` sees them as opaque ops (the tables hold real addresses, which
tracing with fake tensors cannot provide; hence not ``torch.library.triton_op``).
Like every backend, each primitive first runs the one validator (csrc/validate.h).

Runs on CUDA tensors, or on CPU tensors when the kernels were decorated under
``TRITON_INTERPRET=1`` (set it before importing this package).
"""
from typing import List, Optional

import torch
from torch import Tensor

NAME = "triton"

try:
    import triton  # noqa: F401  (probe: everything below needs it)
except ImportError as exc:
    _IMPORT_ERROR = f"triton not installed: {exc}"
else:
    _IMPORT_ERROR = ""
    from .. import _C  # noqa: F401  (the validator: torch.ops.swm_fused.check_*)
    from ._multi_tensor import INTERPRETED
    from .any_nonfinite import any_nonfinite as _any_nonfinite_launch
    from .lerp import lerp_ as _lerp_launch
    from .lerp import lerp_multi_ as _lerp_multi_launch
    from .merge import merge_ as _merge_launch
    from .merge_sparse import dare_drop_ as _dare_drop_launch
    from .merge_sparse import ties_merge_ as _ties_merge_launch
    from .sam_ascent import sam_ascent_ as _sam_ascent_launch
    from .sq_norm import sq_norm as _sq_norm_launch
    from .swag import swag_ as _swag_launch

    DEVICE_TYPE = "cpu" if INTERPRETED else "cuda"

    def _as_flag(found_inf: Optional[Tensor]) -> Optional[Tensor]:
        """The flag as the kernels load it: a float32 scalar."""
        return None if found_inf is None else found_inf.reshape(()).to(torch.float32)

    @torch.library.custom_op("swm_fused_triton::lerp_", mutates_args=("avgs",))
    def _lerp_op(avgs: List[Tensor], srcs: List[Tensor], weight: float, weight_tensor: Optional[Tensor],
                 found_inf: Optional[Tensor]) -> None:
        _lerp_launch(avgs, srcs, weight, weight_tensor, _as_flag(found_inf))

    @torch.library.custom_op("swm_fused_triton::lerp_multi_", mutates_args=("avgs",))
    def _lerp_multi_op(avgs: List[Tensor], srcs: List[Tensor], weights: List[float],
                       found_inf: Optional[Tensor]) -> None:
        n = len(srcs)
        _lerp_multi_launch([avgs[k * n:(k + 1) * n] for k in range(len(weights))], srcs, weights, _as_flag(found_inf))

    @torch.library.custom_op("swm_fused_triton::swag_", mutates_args=("means", "sq_means"))
    def _swag_op(means: List[Tensor], sq_means: List[Tensor], srcs: List[Tensor], weight: float,
                 weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        _swag_launch(means, sq_means, srcs, weight, weight_tensor, _as_flag(found_inf))

    @torch.library.custom_op("swm_fused_triton::merge_", mutates_args=("outs",))
    def _merge_op(outs: List[Tensor], inputs: List[Tensor], weights: List[float]) -> None:
        n = len(outs)
        _merge_launch(outs, [inputs[k * n:(k + 1) * n] for k in range(len(weights))], weights)

    @torch.library.custom_op("swm_fused_triton::any_nonfinite", mutates_args=())
    def _any_nonfinite_op(tensors: List[Tensor]) -> Tensor:
        return _any_nonfinite_launch(tensors)

    @_any_nonfinite_op.register_fake
    def _(tensors: List[Tensor]) -> Tensor:
        return tensors[0].new_empty((), dtype=torch.float32)

    @torch.library.custom_op("swm_fused_triton::sq_norm", mutates_args=())
    def _sq_norm_op(tensors: List[Tensor], scale: List[Tensor]) -> Tensor:
        return _sq_norm_launch(tensors, scale)

    @_sq_norm_op.register_fake
    def _(tensors: List[Tensor], scale: List[Tensor]) -> Tensor:
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        return tensors[0].new_empty((), dtype=dtype)

    @torch.library.custom_op("swm_fused_triton::sam_ascent_", mutates_args=("params", "saved"))
    def _sam_ascent_op(params: List[Tensor], grads: List[Tensor], saved: List[Tensor], scale: Tensor,
                       adaptive: bool, found_inf: Optional[Tensor]) -> None:
        _sam_ascent_launch(params, grads, saved, scale.reshape(()).to(torch.float64), adaptive, _as_flag(found_inf))

    @torch.library.custom_op("swm_fused_triton::ties_merge_", mutates_args=("outs",))
    def _ties_merge_op(outs: List[Tensor], inputs: List[Tensor], weights: List[float], base: List[Tensor],
                       thresholds: Optional[Tensor], majority_sign: str, normalize: bool, scale: float,
                       task_vectors: bool) -> None:
        n = len(outs)
        _ties_merge_launch(outs, [inputs[k * n:(k + 1) * n] for k in range(len(weights))], weights, base, thresholds,
                           majority_sign, normalize, scale, task_vectors)

    @torch.library.custom_op("swm_fused_triton::dare_drop_", mutates_args=("deltas",))
    def _dare_drop_op(deltas: List[Tensor], u: List[Tensor], keep_prob: List[Tensor], p: float, rescale: bool) -> None:
        _dare_drop_launch(deltas, u, keep_prob, p, rescale)

    def lerp_(avgs: List[Tensor], srcs: List[Tensor], weight: float, weight_tensor: Optional[Tensor],
              found_inf: Optional[Tensor]) -> None:
        """``avg <- lerp(avg, src, w)``, ``w = weight_tensor`` if given else ``weight``; one launch per dtype pair."""
        torch.ops.swm_fused.check_lerp_(avgs, srcs, weight_tensor, found_inf)
        _lerp_op(avgs, srcs, weight, weight_tensor, found_inf)

    def lerp_multi_(avgs: List[List[Tensor]], srcs: List[Tensor], weights: List[float],
                    found_inf: Optional[Tensor]) -> None:
        """K profiles of one source in one pass; one launch per dtype group."""
        flat_avgs = [t for x in avgs for t in x]  # k-major, like the compiled op
        torch.ops.swm_fused.check_lerp_multi_(flat_avgs, srcs, len(weights), found_inf)
        _lerp_multi_op(flat_avgs, srcs, list(weights), found_inf)

    def swag_(means: List[Tensor], sq_means: List[Tensor], srcs: List[Tensor], weight: float,
              weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """Both SWAG moments in one pass; one launch per dtype triple."""
        torch.ops.swm_fused.check_swag_(means, sq_means, srcs, weight_tensor, found_inf)
        _swag_op(means, sq_means, srcs, weight, weight_tensor, found_inf)

    def merge_(outs: List[Tensor], inputs: List[List[Tensor]], weights: List[float]) -> None:
        """``out <- sum_k weights[k] * inputs[k][i]``; ``out`` may be one of the inputs."""
        flat_inputs = [t for x in inputs for t in x]  # k-major, like the compiled op
        torch.ops.swm_fused.check_merge_(outs, flat_inputs, len(weights))
        _merge_op(outs, flat_inputs, list(weights))

    def any_nonfinite(tensors: List[Tensor]) -> Tensor:
        """A 0-dim float32 device tensor: 1.0 if any element is NaN/Inf; never read on the host."""
        torch.ops.swm_fused.check_any_nonfinite(tensors)
        return _any_nonfinite_op(tensors)

    def sq_norm(tensors: List[Tensor], scale: List[Tensor]) -> Tensor:
        """A 0-dim device tensor (float64 if a tensor is, else float32): ``sum_i sum((scale_i * t_i)**2)``."""
        torch.ops.swm_fused.check_sq_norm(tensors, scale)
        return _sq_norm_op(tensors, list(scale))

    def sam_ascent_(params: List[Tensor], grads: List[Tensor], saved: List[Tensor], scale: Tensor, adaptive: bool,
                    found_inf: Optional[Tensor]) -> None:
        """``saved <- w``; ``w <- w + ((w*w if adaptive) * g) * scale``; one launch per dtype triple."""
        torch.ops.swm_fused.check_sam_ascent_(params, grads, saved, scale, found_inf)
        _sam_ascent_op(params, grads, saved, scale, adaptive, found_inf)


    def ties_merge_(outs: List[Tensor], inputs: List[List[Tensor]], weights: List[float], base: List[Tensor],
                    thresholds: Optional[Tensor], majority_sign: str, normalize: bool, scale: float,
                    task_vectors: bool) -> None:
        """``out <- base + scale * TIES(inputs)`` in one pass; one launch per dtype group."""
        flat_inputs = [t for x in inputs for t in x]  # k-major, like the compiled op
        torch.ops.swm_fused.check_ties_merge_(outs, flat_inputs, len(weights), base, thresholds, majority_sign)
        _ties_merge_op(outs, flat_inputs, list(weights), list(base), thresholds, majority_sign, normalize, scale,
                       task_vectors)

    def dare_drop_(deltas: List[Tensor], u: List[Tensor], keep_prob: List[Tensor], p: float, rescale: bool) -> None:
        """``delta <- [u < p] * (delta / p if rescale else delta)`` in one pass; one launch per dtype group."""
        torch.ops.swm_fused.check_dare_drop_(deltas, u, keep_prob)
        _dare_drop_op(deltas, u, list(keep_prob), p, rescale)


def unavailable_reason() -> str:
    """Empty when this backend can run here, else the reason it cannot."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not INTERPRETED and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    return ""
