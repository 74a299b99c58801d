"""Triton lerp_ and lerp_multi_: ``avg <- lerp(avg, src, w)`` over a whole list of tensors (EMA and
SWA), and the same for K averages of one source in one pass (post-hoc EMA profiles).

One launch per dtype group of the list; see ``_multi_tensor`` for the tables.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import List, Optional, Sequence, Tuple

import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (LAUNCH_OPTIONS, TRITON_DTYPES, build_launch, chunk_tile, compute_dtype,
                            contiguous_operands, copy_back, float_bits, group_positions, lerp_fma,
                            load_column, scalar_weight, store_column)


@triton.jit(do_not_specialize=["weight_bits"])
def _lerp_kernel(tensor_table, chunk_table, n_chunks, weight_bits, weight_ptr, found_inf_ptr,
                 AVG: tl.constexpr, SRC: tl.constexpr, COMPUTE: tl.constexpr,
                 HAS_WEIGHT_TENSOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, 3, ROWS, BLOCK, ALIGNED)
    if HAS_FOUND_INF:
        # A flagged step loads and stores nothing. The flag is loaded as a [1, 1] block: the
        # interpreter mistypes a broadcast scalar comparison (bool data tagged as float).
        mask = mask & (tl.load(found_inf_ptr + tl.zeros([1, 1], dtype=tl.int32)) == 0)
    weight = scalar_weight(weight_bits, weight_ptr, HAS_WEIGHT_TENSOR, COMPUTE)
    avg = load_column(row, 0, offsets, mask, AVG, COMPUTE, ALIGNED)
    src = load_column(row, 1, offsets, mask, SRC, COMPUTE, ALIGNED)
    store_column(row, 0, offsets, mask, lerp_fma(avg, src, weight), AVG, ALIGNED)


def lerp_(avgs: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """``avg <- lerp(avg, src, w)`` for every pair, with ``w = weight_tensor`` if given else ``weight``.

    Launches once per (avg dtype, src dtype) combination present in the lists.
    ``weight_tensor`` and ``found_inf`` are read by the kernel on the device.
    """
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    avgs = contiguous_operands(avgs, copy_backs)
    srcs = contiguous_operands(srcs, None)
    for (avg_dtype, src_dtype), positions in group_positions([avgs, srcs]).items():
        launch = build_launch([[avgs[i] for i in positions], [srcs[i] for i in positions]])
        _lerp_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, float_bits(weight),
            launch.tensor_table if weight_tensor is None else weight_tensor,
            launch.tensor_table if found_inf is None else found_inf,
            AVG=TRITON_DTYPES[avg_dtype], SRC=TRITON_DTYPES[src_dtype], COMPUTE=compute_dtype(avg_dtype),
            HAS_WEIGHT_TENSOR=weight_tensor is not None, HAS_FOUND_INF=found_inf is not None,
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    copy_back(copy_backs)


@triton.jit
def _lerp_multi_kernel(tensor_table, chunk_table, n_chunks, extras, found_inf_ptr, K: tl.constexpr,
                       AVG: tl.constexpr, SRC: tl.constexpr, COMPUTE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Row of position i: [avg_0, ..., avg_{K-1}, src, numel]; extras: the K weights' float64 bits."""
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, K + 2, ROWS, BLOCK, ALIGNED)
    if HAS_FOUND_INF:
        mask = mask & (tl.load(found_inf_ptr + tl.zeros([1, 1], dtype=tl.int32)) == 0)
    src = load_column(row, K, offsets, mask, SRC, COMPUTE, ALIGNED)  # read once for all K profiles
    for k in tl.static_range(K):
        weight = tl.load(extras + k).to(tl.float64, bitcast=True).to(COMPUTE)
        avg = load_column(row, k, offsets, mask, AVG, COMPUTE, ALIGNED)
        store_column(row, k, offsets, mask, lerp_fma(avg, src, weight), AVG, ALIGNED)


def lerp_multi_(avgs: Sequence[Sequence[Tensor]], srcs: Sequence[Tensor], weights: Sequence[float],
                found_inf: Optional[Tensor]) -> None:
    """``avgs[k][i] <- lerp(avgs[k][i], src[i], weights[k])`` for every k, reading each source once.

    Launches once per (avg dtypes, src dtype) group; a group whose K averages do not share one
    dtype runs as K ``lerp_`` launches instead (same results, the source read K times).
    """
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    avgs = [contiguous_operands(x, copy_backs) for x in avgs]
    srcs = contiguous_operands(srcs, None)
    weight_bits = [float_bits(w) for w in weights]
    k_total = len(avgs)
    for (*avg_dtypes, src_dtype), positions in group_positions([*avgs, srcs]).items():
        columns = [[col[i] for i in positions] for col in (*avgs, srcs)]
        if len(set(avg_dtypes)) > 1:
            for k in range(k_total):
                lerp_(columns[k], columns[-1], weights[k], None, found_inf)
            continue
        launch = build_launch(columns, extras=weight_bits)
        _lerp_multi_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, launch.extras,
            launch.tensor_table if found_inf is None else found_inf, K=k_total,
            AVG=TRITON_DTYPES[avg_dtypes[0]], SRC=TRITON_DTYPES[src_dtype], COMPUTE=compute_dtype(avg_dtypes[0]),
            HAS_FOUND_INF=found_inf is not None, ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned,
            **LAUNCH_OPTIONS)
    copy_back(copy_backs)
