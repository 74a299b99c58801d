"""Triton sam_ascent_: SAM's ascent in one pass, ``saved <- w`` and ``w <- w + ((w*w if adaptive) * g) * scale``.

One launch per (params dtype, grads dtype, saved dtype) group; see ``_multi_tensor`` for the tables.
Products and the sum are rounded separately, in the params' compute type, as davda54/sam's
per-parameter torch code does. ``scale`` and ``found_inf`` are read on the device; a flagged step
still writes ``saved`` (so a restore from it stays exact) and leaves the params as they are.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import List, Optional, Sequence, Tuple

import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (LAUNCH_OPTIONS, TRITON_DTYPES, build_launch, chunk_tile, compute_dtype,
                            contiguous_operands, copy_back, group_positions, load_column, store_column)


@triton.jit
def _sam_ascent_kernel(tensor_table, chunk_table, n_chunks, scale_ptr, found_inf_ptr,
                       PARAM: tl.constexpr, GRAD: tl.constexpr, SAVED: tl.constexpr, COMPUTE: tl.constexpr,
                       ADAPTIVE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, 4, ROWS, BLOCK, ALIGNED)
    w = load_column(row, 0, offsets, mask, PARAM, COMPUTE, ALIGNED)
    if SAVED == tl.float64 or COMPUTE == tl.float32:
        store_column(row, 2, offsets, mask, w, SAVED, ALIGNED)
    else:  # float64 params into a narrower copy: through float32, as torch converts
        store_column(row, 2, offsets, mask, w.to(tl.float32), SAVED, ALIGNED)
    param_mask = mask
    if HAS_FOUND_INF:
        # The flag is loaded as a [1, 1] block: the interpreter mistypes a broadcast scalar comparison.
        param_mask = mask & (tl.load(found_inf_ptr + tl.zeros([1, 1], dtype=tl.int32)) == 0)
    g = load_column(row, 1, offsets, param_mask, GRAD, COMPUTE, ALIGNED)
    scale = tl.load(scale_ptr).to(COMPUTE)
    if ADAPTIVE:
        e = ((w * w) * g) * scale
    else:
        e = g * scale
    store_column(row, 0, offsets, param_mask, w + e, PARAM, ALIGNED)


def sam_ascent_(params: Sequence[Tensor], grads: Sequence[Tensor], saved: Sequence[Tensor], scale: Tensor,
                adaptive: bool, found_inf: Optional[Tensor]) -> None:
    """``saved <- w``; ``w <- w + ((w*w if adaptive) * g) * scale``; one launch per dtype group.

    ``scale`` (a float64 scalar) and ``found_inf`` (a float32 scalar) are read by the kernel.
    """
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    params = contiguous_operands(params, copy_backs)
    grads = contiguous_operands(grads, None)
    saved = contiguous_operands(saved, copy_backs)
    for (param_dtype, grad_dtype, saved_dtype), positions in group_positions([params, grads, saved]).items():
        launch = build_launch([[params[i] for i in positions], [grads[i] for i in positions],
                               [saved[i] for i in positions]])
        _sam_ascent_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, scale,
            launch.tensor_table if found_inf is None else found_inf,
            PARAM=TRITON_DTYPES[param_dtype], GRAD=TRITON_DTYPES[grad_dtype], SAVED=TRITON_DTYPES[saved_dtype],
            COMPUTE=compute_dtype(param_dtype), ADAPTIVE=adaptive, HAS_FOUND_INF=found_inf is not None,
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    copy_back(copy_backs)
