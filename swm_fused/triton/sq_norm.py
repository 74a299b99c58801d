"""Triton sq_norm: the squared L2 norm of a whole list of tensors, ``sum_i sum((scale_i * t_i)**2)``.

One launch per (tensor dtype, scale dtype) group; see ``_multi_tensor`` for the tables. Each program
squares its tile in the tensor's compute type (float32, float64 for float64 tensors), sums the squares
in float64 and writes one partial; the partials are added on the device (no host sync) and the total
is rounded once to float32 (kept in float64 when a tensor is float64).
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import List, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (LAUNCH_OPTIONS, TRITON_DTYPES, build_launch, chunk_tile, compute_dtype,
                            contiguous_operands, group_positions, load_column)


@triton.jit
def _sq_norm_kernel(tensor_table, chunk_table, n_chunks, partials_ptr, X: tl.constexpr, S: tl.constexpr,
                    COMPUTE: tl.constexpr, HAS_SCALE: tl.constexpr, ROW_WIDTH: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, ROW_WIDTH, ROWS, BLOCK, ALIGNED)
    x = load_column(row, 0, offsets, mask, X, COMPUTE, ALIGNED)
    if HAS_SCALE:
        x = load_column(row, 1, offsets, mask, S, COMPUTE, ALIGNED) * x
    squares = tl.where(mask, x * x, 0.0).to(tl.float64)  # masked lanes hold garbage
    tl.store(partials_ptr + tl.program_id(0), tl.sum(tl.sum(squares, axis=1), axis=0))


def sq_norm(tensors: Sequence[Tensor], scale: Sequence[Tensor]) -> Tensor:
    """A 0-dim float32 tensor on the tensors' device: ``sum_i sum((scale_i * t_i)**2)`` (``scale`` empty: no scale).

    Launches once per dtype group; the partial sums stay on the device.
    """
    device = tensors[0].device
    tensors = contiguous_operands(tensors, None)
    scaled = len(scale) > 0
    columns = [tensors, contiguous_operands(scale, None)] if scaled else [tensors]
    partials: List[Tensor] = []
    for dtypes, positions in group_positions(columns).items():
        launch = build_launch([[col[i] for i in positions] for col in columns])
        partial = torch.empty(launch.grid[0], dtype=torch.float64, device=device)
        _sq_norm_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, partial,
            X=TRITON_DTYPES[dtypes[0]], S=TRITON_DTYPES[dtypes[-1]], COMPUTE=compute_dtype(dtypes[0]),
            HAS_SCALE=scaled, ROW_WIDTH=len(columns) + 1, ROWS=launch.rows, BLOCK=launch.block,
            ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
        partials.append(partial)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in columns[0]) else torch.float32
    if not partials:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.cat(partials).sum().to(dtype)
