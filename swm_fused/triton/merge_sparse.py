"""Triton ties_merge_ and dare_drop_: the element-wise steps of the sparsifying merges, one pass each.

One launch per dtype group; see ``_multi_tensor`` for the tables.

- ties_merge_: the tensor-table row of position i is ``[out, base, bands, input_0, ..., input_{K-1}, numel]``
  (``base`` and ``bands`` point at ``out`` when absent and are then never read); ``bands`` is position i's
  row of K float64 ``(lo, hi)`` pairs. The extras hold the K weights (float64 bits), one dtype code per
  input (as merge_'s do) and ``scale`` (float64 bits).
- dare_drop_: rows ``[delta, u, keep_prob, numel]`` (``keep_prob`` points at ``delta`` when one number
  serves every element; its float64 bits are then the extras).

Arithmetic follows the reference backend operation for operation, so the results are the same bits.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (DTYPE_CODES, LAUNCH_OPTIONS, TRITON_DTYPES, build_launch, chunk_tile,
                            contiguous_operands, copy_back, float_bits, group_positions, load_coded_column,
                            load_column, store_column)

ELECTIONS = {"sum": 0, "count": 1, "none": 2}
# hi above it is +inf: no upper bound. A constexpr: a compiled kernel may read no other global.
DOUBLE_MAX = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _divide(a, b, COMPUTE: tl.constexpr):
    """a / b rounded once: div_rn for float32 (a plain float32 `/` may be approximate on GPUs); float64 `/` is IEEE."""
    if COMPUTE == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _task_term(row, offsets, mask, extras, k, b, K: tl.constexpr, SUBTRACT: tl.constexpr, BANDED: tl.constexpr,
               COMPUTE: tl.constexpr, ALIGNED: tl.constexpr):
    """(x_k, w_k): x_k = w_k * d_k over the tile where |d_k| lies in model k's band [lo, hi), else 0."""
    w = tl.load(extras + k).to(tl.float64, bitcast=True).to(COMPUTE)
    d = load_coded_column(row, 3 + k, offsets, mask, tl.load(extras + K + k), COMPUTE, ALIGNED)
    if SUBTRACT:
        d = d - b
    x = w * d
    if BANDED:
        bands = tl.load(row + 2).to(tl.pointer_type(tl.float64))
        lo = tl.load(bands + 2 * k)[:, None]
        hi = tl.load(bands + 2 * k + 1)[:, None]
        magnitude = tl.abs(d).to(tl.float64)
        x = tl.where((magnitude >= lo) & ((magnitude < hi) | (hi > DOUBLE_MAX)), x, 0.0)
    return x, w


@triton.jit
def _ties_kernel(tensor_table, chunk_table, n_chunks, extras, K: tl.constexpr, ELECTION: tl.constexpr,
                 NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr, SUBTRACT: tl.constexpr, BANDED: tl.constexpr,
                 OUT: tl.constexpr, BASE: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, K + 4, ROWS, BLOCK, ALIGNED)
    if HAS_BASE:
        b = load_column(row, 1, offsets, mask, BASE, COMPUTE, ALIGNED)
    else:
        b = tl.zeros([ROWS, BLOCK], dtype=COMPUTE)
    votes = tl.zeros([ROWS, BLOCK], dtype=COMPUTE)
    if ELECTION != 2:
        for k in range(K):
            x, w = _task_term(row, offsets, mask, extras, k, b, K, SUBTRACT, BANDED, COMPUTE, ALIGNED)
            if ELECTION == 0:
                votes = votes + x
            else:  # sign(0) = sign(NaN) = 0
                votes = votes + ((x > 0).to(COMPUTE) - (x < 0).to(COMPUTE))
    positive = votes >= 0
    mixed = tl.zeros([ROWS, BLOCK], dtype=COMPUTE)
    divisor = tl.zeros([ROWS, BLOCK], dtype=COMPUTE)
    for k in range(K):  # the terms again, computed from the inputs the election just read
        x, w = _task_term(row, offsets, mask, extras, k, b, K, SUBTRACT, BANDED, COMPUTE, ALIGNED)
        if ELECTION == 2:
            mixed = mixed + x
            divisor = divisor + w
        else:
            kept = tl.where(positive, x > 0, x < 0)
            mixed = mixed + tl.where(kept, x, 0.0)
            divisor = divisor + tl.where(kept, w, 0.0)
    if NORMALIZE:
        mixed = _divide(mixed, tl.where(divisor == 0, 1.0, divisor).to(COMPUTE), COMPUTE)
    result = tl.load(extras + 2 * K).to(tl.float64, bitcast=True).to(COMPUTE) * mixed
    if HAS_BASE:
        result = b + result
    if OUT != tl.float64:
        result = result.to(tl.float32)  # float64 into a narrower output: through float32, as torch converts
    # Every input of these elements has been read, so `out` may be the base or one of the inputs.
    store_column(row, 0, offsets, mask, result, OUT, ALIGNED)


def ties_merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float],
                base: Sequence[Tensor], thresholds: Optional[Tensor], majority_sign: str, normalize: bool,
                scale: float, task_vectors: bool) -> None:
    """TIES' trim, election and masked sum, then ``out = base + scale * mixed``; see the reference backend.

    Launches once per combination of (out, base, inputs[0], ..., inputs[K-1]) dtypes present in the lists.
    """
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    outs = contiguous_operands(outs, copy_backs)
    inputs = [contiguous_operands(x, None) for x in inputs]
    bases = contiguous_operands(base, None) if len(base) else outs
    # (N, K, 2) float64: one row of bands per position, which holds any floating threshold exactly.
    bands = thresholds.to(torch.float64).permute(1, 0, 2).contiguous() if thresholds is not None else None
    extras = [float_bits(w) for w in weights]
    for (out_dtype, base_dtype, *input_dtypes), positions in group_positions([outs, bases, *inputs]).items():
        band_rows = [bands[i] for i in positions] if bands is not None else [outs[i] for i in positions]
        columns = [[outs[i] for i in positions], [bases[i] for i in positions], band_rows,
                   *([x[i] for i in positions] for x in inputs)]
        launch = build_launch(columns, extras=extras + [DTYPE_CODES[d] for d in input_dtypes] + [float_bits(scale)])
        wide = torch.float64 in (out_dtype, base_dtype, *input_dtypes)
        _ties_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, launch.extras, K=len(inputs),
            ELECTION=ELECTIONS[majority_sign], NORMALIZE=normalize, HAS_BASE=len(base) > 0,
            SUBTRACT=len(base) > 0 and not task_vectors, BANDED=bands is not None, OUT=TRITON_DTYPES[out_dtype],
            BASE=TRITON_DTYPES[base_dtype], COMPUTE=tl.float64 if wide else tl.float32,
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    copy_back(copy_backs)


@triton.jit
def _drop_kernel(tensor_table, chunk_table, n_chunks, extras, DELTA: tl.constexpr, U: tl.constexpr,
                 P: tl.constexpr, PER_ELEMENT: tl.constexpr, RESCALE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, 4, ROWS, BLOCK, ALIGNED)
    d = load_column(row, 0, offsets, mask, DELTA, tl.float64, ALIGNED)
    u = load_column(row, 1, offsets, mask, U, tl.float64, ALIGNED)
    if PER_ELEMENT:
        p = load_column(row, 2, offsets, mask, P, tl.float64, ALIGNED)
    else:
        p = tl.load(extras).to(tl.float64, bitcast=True)
    if RESCALE:
        d = d / p
    value = tl.where(u < p, d, 0.0)
    if DELTA != tl.float64:
        value = value.to(tl.float32)  # through float32 into 16-bit deltas, as torch converts float64
    store_column(row, 0, offsets, mask, value, DELTA, ALIGNED)


def dare_drop_(deltas: Sequence[Tensor], u: Sequence[Tensor], keep_prob: Sequence[Tensor], p: float,
               rescale: bool) -> None:
    """``delta <- [u < p] * (delta / p if rescale else delta)``, compared and divided in float64; one launch per
    (delta, u, keep_prob) dtype group. ``keep_prob`` empty: the number ``p`` for every element."""
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    deltas = contiguous_operands(deltas, copy_backs)
    u = contiguous_operands(u, None)
    probs = contiguous_operands(keep_prob, None) if len(keep_prob) else deltas
    for (delta_dtype, u_dtype, p_dtype), positions in group_positions([deltas, u, probs]).items():
        launch = build_launch([[col[i] for i in positions] for col in (deltas, u, probs)], extras=[float_bits(p)])
        _drop_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, launch.extras, DELTA=TRITON_DTYPES[delta_dtype],
            U=TRITON_DTYPES[u_dtype], P=TRITON_DTYPES[p_dtype], PER_ELEMENT=len(keep_prob) > 0, RESCALE=rescale,
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    copy_back(copy_backs)
