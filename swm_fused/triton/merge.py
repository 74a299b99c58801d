"""Triton merge_: ``out <- sum_k weights[k] * inputs[k]`` for any K in one launch.

One launch per (out dtype, input dtype for each k) group; see ``_multi_tensor`` for the tables.
The tensor table row of position i is ``[out, input_0, ..., input_{K-1}, numel]``; the
extras hold the K weights (float64 bits) and one dtype code per input, read in-kernel.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

from typing import List, Sequence, Tuple

import triton
import triton.language as tl
from torch import Tensor

from ._multi_tensor import (DTYPE_CODES, LAUNCH_OPTIONS, TRITON_DTYPES, build_launch, chunk_tile, compute_dtype,
                            contiguous_operands, copy_back, float_bits, group_positions, load_coded_column,
                            store_column)


@triton.jit
def _weighted_input(row, offsets, mask, extras, k, K: tl.constexpr, COMPUTE: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """weights[k] * inputs[k] over the tile, in the compute type (the input's dtype is a runtime code)."""
    weight = tl.load(extras + k).to(tl.float64, bitcast=True).to(COMPUTE)
    return weight * load_coded_column(row, 1 + k, offsets, mask, tl.load(extras + K + k), COMPUTE, ALIGNED)


@triton.jit
def _merge_kernel(tensor_table, chunk_table, n_chunks, extras, K: tl.constexpr, OUT: tl.constexpr,
                  COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row, offsets, mask = chunk_tile(tensor_table, chunk_table, n_chunks, K + 2, ROWS, BLOCK, ALIGNED)
    acc = _weighted_input(row, offsets, mask, extras, 0, K, COMPUTE, ALIGNED)
    for k in range(1, K):
        acc = acc + _weighted_input(row, offsets, mask, extras, k, K, COMPUTE, ALIGNED)
    # Every input of these elements has been read, so `out` may be one of the inputs.
    store_column(row, 0, offsets, mask, acc, OUT, ALIGNED)


def merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> None:
    """``out <- sum_k weights[k] * inputs[k][i]`` for every position i, accumulated in order k = 0..K-1.

    Computes in float32 (float64 for float64 outputs), rounding once at the store; ``out``
    may be the very same tensor as one of the inputs. Launches once per combination of
    (out dtype, inputs[0] dtype, ..., inputs[K-1] dtype) present in the lists.
    """
    copy_backs: List[Tuple[Tensor, Tensor]] = []
    outs = contiguous_operands(outs, copy_backs)
    inputs = [contiguous_operands(x, None) for x in inputs]
    weight_bits = [float_bits(w) for w in weights]
    for (out_dtype, *input_dtypes), positions in group_positions([outs, *inputs]).items():
        launch = build_launch([[col[i] for i in positions] for col in (outs, *inputs)],
                              extras=weight_bits + [DTYPE_CODES[d] for d in input_dtypes])
        _merge_kernel[launch.grid](
            launch.tensor_table, launch.chunk_table, launch.n_chunks, launch.extras, K=len(inputs),
            OUT=TRITON_DTYPES[out_dtype], COMPUTE=compute_dtype(out_dtype),
            ROWS=launch.rows, BLOCK=launch.block, ALIGNED=launch.aligned, **LAUNCH_OPTIONS)
    copy_back(copy_backs)
