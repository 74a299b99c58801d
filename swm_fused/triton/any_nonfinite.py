"""Triton any_nonfinite: one device flag, set by any NaN/Inf in any tensor of a list.

One launch per dtype in the list; see ``_multi_tensor`` for the tables. Elements are
tested on their raw bits (all exponent bits set), so nothing is converted.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (LAUNCH_OPTIONS, build_launch, chunk_tile, contiguous_operands, group_positions,
                            load_column)

# dtype -> (integer type of the same width, exponent bits)
_EXPONENT_BITS = {
    torch.float32: (tl.int32, 0x7F800000),
    torch.float64: (tl.int64, 0x7FF0000000000000),
    torch.bfloat16: (tl.int16, 0x7F80),
    torch.float16: (tl.int16, 0x7C00),
}


@triton.jit
def _any_nonfinite_kernel(tensor_table, chunk_table, n_chunks, flag_ptr, BITS: tl.constexpr,
                          EXPONENT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                          ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, 2, ROWS, BLOCK, ALIGNED)
    bits = load_column(row, 0, offsets, mask, BITS, BITS, ALIGNED)
    nonfinite = (((bits & EXPONENT) == EXPONENT) & mask).to(tl.int32)
    # Programs that find one all store the same value, so they need no ordering.
    tl.store(flag_ptr, 1.0, mask=tl.max(tl.max(nonfinite, axis=1), axis=0) > 0)


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim float32 tensor on the tensors' device: 1.0 if any element is NaN/Inf, else 0.0.

    Launches once per dtype present; the flag is written by the kernels, never read on the host.
    """
    flag = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    tensors = contiguous_operands(tensors, None)
    for (dtype,), positions in group_positions([tensors]).items():
        launch = build_launch([[tensors[i] for i in positions]])
        bits, exponent = _EXPONENT_BITS[dtype]
        _any_nonfinite_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, flag, BITS=bits, EXPONENT=exponent,
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    return flag
