"""Reference backend: pure PyTorch, written as plainly as the math.

This is the oracle the other backends are tested against, and the fallback
when nothing faster is available. Each function first runs the one validator
(csrc/validate.h, through its ``check_*`` op), like every backend; arithmetic
runs in float32 (float64 for float64 averages) and rounds once, at the store.

Primitives (shared by every backend):
    lerp_(avgs, srcs, weight, weight_tensor, found_inf)
        avg <- avg + w * (src - avg)             (EMA: w = 1 - decay, SWA: w = 1/(n+1))
    lerp_multi_(avgs, srcs, weights, found_inf)
        avgs[k] <- lerp(avgs[k], src, weights[k]) for k = 0..K-1  (K EMA profiles, one source)
    swag_(means, sq_means, srcs, weight, weight_tensor, found_inf)
        mean <- mean + w * (src - mean);  sq_mean <- sq_mean + w * (src^2 - sq_mean)
    merge_(outs, inputs, weights)
        out <- sum_k weights[k] * inputs[k]
    any_nonfinite(tensors) -> 0-dim float32 tensor, 1.0 if any NaN/Inf (floating tensors only)
    sq_norm(tensors, scale) -> 0-dim tensor: sum_i sum((scale_i * t_i)^2); ``scale`` empty: no scale
        (float64 when any tensor is float64, else float32)
    sam_ascent_(params, grads, saved, scale, adaptive, found_inf)
        saved <- w;  w <- w + ((w*w if adaptive else 1) * g) * scale  (w unchanged when found_inf != 0)
    ties_merge_(outs, inputs, weights, base, thresholds, majority_sign, normalize, scale, task_vectors)
        out <- base + scale * mixed, mixed = TIES' elected, masked (and normalized) sum of the trimmed
        task vectors w_k * (inputs[k] - base)   (see ties_merge_ below for every step)
    dare_drop_(deltas, u, keep_prob, p, rescale)
        delta <- [u < p] * (delta / p if rescale else delta), p = keep_prob[i] (empty list: the number p)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (the validator: torch.ops.swm_fused.check_*)

NAME = "reference"


def supports(device: torch.device) -> bool:
    return True


def compute_dtype(avg_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if avg_dtype == torch.float64 else torch.float32


def _weight(weight: float, weight_tensor: Optional[Tensor], dtype: torch.dtype):
    return weight if weight_tensor is None else weight_tensor.to(dtype)


def _store(dst: Tensor, value: Tensor, found_inf: Optional[Tensor]) -> None:
    if found_inf is not None:  # keep the old value when the step is flagged
        value = torch.where(found_inf.reshape(()) != 0, dst.to(value.dtype), value)
    dst.copy_(value)


def lerp_(avgs: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    torch.ops.swm_fused.check_lerp_(avgs, srcs, weight_tensor, found_inf)
    for avg, src in zip(avgs, srcs):
        ct = compute_dtype(avg.dtype)
        a, s = avg.to(ct), src.to(ct)
        _store(avg, torch.lerp(a, s, _weight(weight, weight_tensor, ct)), found_inf)


def lerp_multi_(avgs: Sequence[Sequence[Tensor]], srcs: Sequence[Tensor], weights: Sequence[float],
                found_inf: Optional[Tensor]) -> None:
    torch.ops.swm_fused.check_lerp_multi_([t for x in avgs for t in x], srcs, len(weights), found_inf)
    for avg_list, w in zip(avgs, weights):
        for avg, src in zip(avg_list, srcs):
            ct = compute_dtype(avg.dtype)
            _store(avg, torch.lerp(avg.to(ct), src.to(ct), w), found_inf)


def swag_(means: Sequence[Tensor], sq_means: Sequence[Tensor], srcs: Sequence[Tensor],
          weight: float, weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    torch.ops.swm_fused.check_swag_(means, sq_means, srcs, weight_tensor, found_inf)
    for mean, sq_mean, src in zip(means, sq_means, srcs):
        ct_mean, ct_sq = compute_dtype(mean.dtype), compute_dtype(sq_mean.dtype)  # each moment in its own type
        new_mean = torch.lerp(mean.to(ct_mean), src.to(ct_mean), _weight(weight, weight_tensor, ct_mean))
        s = src.to(ct_sq)
        new_sq = torch.lerp(sq_mean.to(ct_sq), s * s, _weight(weight, weight_tensor, ct_sq))
        _store(mean, new_mean, found_inf)
        _store(sq_mean, new_sq, found_inf)


def merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]],
           weights: Sequence[float]) -> None:
    torch.ops.swm_fused.check_merge_(outs, [t for x in inputs for t in x], len(weights))
    for i, out in enumerate(outs):
        ct = compute_dtype(out.dtype)
        acc = weights[0] * inputs[0][i].to(ct)
        for k in range(1, len(inputs)):
            acc = acc + weights[k] * inputs[k][i].to(ct)
        out.copy_(acc)  # every input was read above, so `out` may alias one of them


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    torch.ops.swm_fused.check_any_nonfinite(tensors)
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    flags = [torch.isfinite(t).logical_not().any() for t in tensors if t.numel()]
    if not flags:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(flags).any().to(torch.float32)


def norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """sq_norm's result dtype: float64 when any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sq_norm(tensors: Sequence[Tensor], scale: Sequence[Tensor]) -> Tensor:
    """Each square in the tensor's compute type, the sums in float64, one rounding to float32 at the end
    (none when a tensor is float64: the result is then float64)."""
    torch.ops.swm_fused.check_sq_norm(tensors, scale)
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, t in enumerate(tensors):
        ct = compute_dtype(t.dtype)
        v = t.to(ct) * scale[i].to(ct) if len(scale) else t.to(ct)
        total = total + (v * v).sum(dtype=torch.float64)
    return total.to(norm_dtype(tensors))


def sam_ascent_(params: Sequence[Tensor], grads: Sequence[Tensor], saved: Sequence[Tensor], scale: Tensor,
                adaptive: bool, found_inf: Optional[Tensor]) -> None:
    """davda54/sam's per-parameter code, in the params' compute type: e_w = (p^2 if adaptive) * g * scale."""
    torch.ops.swm_fused.check_sam_ascent_(params, grads, saved, scale, found_inf)
    for p, g, s in zip(params, grads, saved):
        ct = compute_dtype(p.dtype)
        w = p.to(ct)
        e = (w * w) * g.to(ct) if adaptive else g.to(ct)
        new = w + e * scale.reshape(()).to(ct)
        s.copy_(w)
        _store(p, new, found_inf)


def merge_compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """ties_merge_'s compute dtype of one position: float64 when any of its tensors is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ties_merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float],
                base: Sequence[Tensor], thresholds: Optional[Tensor], majority_sign: str, normalize: bool,
                scale: float, task_vectors: bool) -> None:
    """TIES' trim, sign election and disjoint (mean) merge, element by element, in position i's compute dtype:

    d_k = inputs[k] - base (inputs[k] when there is no base or ``task_vectors``); x_k = w_k * d_k where
    lo_k <= |d_k| < hi_k (hi_k = +inf: no upper bound; compared exactly), else 0; E = sum_k x_k ("sum") or
    sum_k sign(x_k) ("count", sign(0) = sign(NaN) = 0), added in order k; kept_k = x_k > 0 where E >= 0, else
    x_k < 0 (every k for "none"); M = sum_k kept_k x_k, D = sum_k kept_k w_k (from 0, in order k); mixed = M / D
    (D = 0 read as 1) with ``normalize``, else M; out = base + scale * mixed (scale * mixed without a base).
    Each task vector is computed twice (election, then sums), so one is alive at a time.
    """
    k_total = len(weights)
    torch.ops.swm_fused.check_ties_merge_(outs, [t for x in inputs for t in x], k_total, base, thresholds,
                                          majority_sign)
    for i, out in enumerate(outs):
        ct = merge_compute_dtype([out, *(x[i] for x in inputs), *base[i:i + 1]])
        b = base[i].to(ct) if len(base) else None

        def term(k: int) -> Tensor:
            d = inputs[k][i].to(ct)
            if b is not None and not task_vectors:
                d = d - b
            x = d * weights[k]
            if thresholds is None:
                return x
            lo, hi = thresholds[k, i, 0].double(), thresholds[k, i, 1].double()
            magnitude = d.abs().double()
            return torch.where((magnitude >= lo) & ((magnitude < hi) | (hi == math.inf)), x, 0.0)

        votes = torch.zeros(out.shape, dtype=ct, device=out.device)
        if majority_sign != "none":
            for k in range(k_total):
                x = term(k)
                votes = votes + (x if majority_sign == "sum" else (x > 0).to(ct) - (x < 0).to(ct))
        positive = votes >= 0
        mixed = torch.zeros_like(votes)
        divisor = torch.zeros_like(votes)
        for k in range(k_total):
            x = term(k)
            kept = torch.where(positive, x > 0, x < 0) if majority_sign != "none" else torch.ones_like(positive)
            mixed = mixed + torch.where(kept, x, 0.0)
            divisor = divisor + kept.to(ct) * weights[k]  # w_k or 0: the weights are finite
        if normalize:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        result = mixed * scale
        out.copy_(result if b is None else b + result)  # every input was read above: out may alias them


def dare_drop_(deltas: Sequence[Tensor], u: Sequence[Tensor], keep_prob: Sequence[Tensor], p: float,
               rescale: bool) -> None:
    """Each kept value (u < p, compared exactly) is ``delta / p`` in float64 (``delta`` without ``rescale``),
    rounded once into the delta's dtype (through float32 into 16-bit dtypes, as torch converts float64)."""
    torch.ops.swm_fused.check_dare_drop_(deltas, u, keep_prob)
    for i, delta in enumerate(deltas):
        keep_i = keep_prob[i].double() if len(keep_prob) else p
        d = delta.double()
        value = d / keep_i if rescale else d
        delta.copy_(torch.where(u[i].double() < keep_i, value, 0.0))
