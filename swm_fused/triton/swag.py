"""Triton swag_: SWAG's first and second moments in one pass over memory.

One launch per (mean dtype, sq_mean dtype, src dtype) group; see ``_multi_tensor`` for the tables.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (LAUNCH_OPTIONS, TRITON_DTYPES, build_launch, chunk_tile, compute_dtype,
                            contiguous_operands, copy_back, float_bits, group_positions, lerp_fma,
                            load_column, scalar_weight, store_column)


@triton.jit(do_not_specialize=["weight_bits"])
def _swag_kernel(tensor_table, chunk_table, n_chunks, weight_bits, weight_ptr, found_inf_ptr,
                 MEAN: tl.constexpr, SQ_MEAN: tl.constexpr, SRC: tl.constexpr,
                 MEAN_COMPUTE: tl.constexpr, SQ_COMPUTE: tl.constexpr, SRC_COMPUTE: tl.constexpr,
                 HAS_WEIGHT_TENSOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, 4, ROWS, BLOCK, ALIGNED)
    if HAS_FOUND_INF:
        # A flagged step loads and stores nothing. The flag is loaded as a [1, 1] block: the
        # interpreter mistypes a broadcast scalar comparison (bool data tagged as float).
        mask = mask & (tl.load(found_inf_ptr + tl.zeros([1, 1], dtype=tl.int32)) == 0)
    mean = load_column(row, 0, offsets, mask, MEAN, MEAN_COMPUTE, ALIGNED)
    sq_mean = load_column(row, 1, offsets, mask, SQ_MEAN, SQ_COMPUTE, ALIGNED)
    src = load_column(row, 2, offsets, mask, SRC, SRC_COMPUTE, ALIGNED)  # exact; each moment rounds it below
    mean_weight = scalar_weight(weight_bits, weight_ptr, HAS_WEIGHT_TENSOR, MEAN_COMPUTE)
    sq_weight = scalar_weight(weight_bits, weight_ptr, HAS_WEIGHT_TENSOR, SQ_COMPUTE)
    sq_src = src.to(SQ_COMPUTE)
    store_column(row, 0, offsets, mask, lerp_fma(mean, src.to(MEAN_COMPUTE), mean_weight), MEAN, ALIGNED)
    store_column(row, 1, offsets, mask, lerp_fma(sq_mean, sq_src * sq_src, sq_weight), SQ_MEAN, ALIGNED)


def swag_(means: Sequence[Tensor], sq_means: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
          weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """``mean <- lerp(mean, src, w)`` and ``sq_mean <- lerp(sq_mean, src*src, w)`` in one pass.

    ``w = weight_tensor`` if given else ``weight``. Each moment is computed in float32, or
    float64 when that moment is float64. Launches once per (mean, sq_mean, src) dtype
    combination present; ``weight_tensor`` and ``found_inf`` are read on the device.
    """
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    means = contiguous_operands(means, copy_backs)
    sq_means = contiguous_operands(sq_means, copy_backs)
    srcs = contiguous_operands(srcs, None)
    for (mean_dtype, sq_dtype, src_dtype), positions in group_positions([means, sq_means, srcs]).items():
        launch = build_launch([[means[i] for i in positions], [sq_means[i] for i in positions],
                               [srcs[i] for i in positions]])
        _swag_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, float_bits(weight),
            launch.tensor_table if weight_tensor is None else weight_tensor,
            launch.tensor_table if found_inf is None else found_inf,
            MEAN=TRITON_DTYPES[mean_dtype], SQ_MEAN=TRITON_DTYPES[sq_dtype], SRC=TRITON_DTYPES[src_dtype],
            MEAN_COMPUTE=compute_dtype(mean_dtype), SQ_COMPUTE=compute_dtype(sq_dtype),
            SRC_COMPUTE=tl.float64 if torch.float64 in (mean_dtype, sq_dtype) else tl.float32,
            HAS_WEIGHT_TENSOR=weight_tensor is not None, HAS_FOUND_INF=found_inf is not None,
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    copy_back(copy_backs)
