"""Launch tables shared by the Triton kernels: many tensors, one launch per dtype group.

Triton kernels take a fixed argument list, so a whole list of tensors reaches a
kernel through memory instead: one int64 buffer per launch, built on the host,
uploaded once and cached, holding

- the **tensor table**, one row per tensor: ``[data_ptr of role 0, ..., data_ptr
  of role R-1, numel]`` (the roles are e.g. avg and src; the kernel casts each
  address with ``.to(tl.pointer_type(DTYPE))``);
- the **chunk table**, one int64 per ``BLOCK``-element chunk of every tensor:
  ``(tensor row << 32) | chunk number``;
- op-specific **extras** (merge: the weights' float64 bits and input dtype codes).

Program ``p`` takes chunk entries ``p*ROWS .. p*ROWS+ROWS-1`` and works on them as
one ``[ROWS, BLOCK]`` tile, so thousands of small tensors share a few programs.
A kernel casts each address to a single element type, so callers split a list
into groups of positions with equal dtypes (:func:`group_positions`) and launch
once per group.

The device helpers at the bottom (tile decoding, torch's lerp formula, bf16
rounding) are shared by the kernels in this package.
"""
# No `from __future__ import annotations`: Triton 3.1's interpreter spots constexpr parameters
# only by their evaluated annotation.

import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

ALIGN = tl.constexpr(16)
"""A group whose addresses are all 16-byte aligned and whose sizes are all multiples of ALIGN
elements (FlatBuffer storages always are) gets alignment hints, hence 16-byte vector loads on GPUs."""

KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
                 torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
"""Runtime dtype codes of :func:`load_coded_column`, for columns whose dtype is not a launch constant."""


@triton.jit
def chunk_tile(tensor_table, chunk_table, n_chunks, ROW_WIDTH: tl.constexpr, ROWS: tl.constexpr,
               BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tile: tensor-table row addresses [ROWS], element offsets and mask [ROWS, BLOCK]."""
    chunk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = chunk < n_chunks
    entry = tl.load(chunk_table + chunk, mask=valid, other=0)  # rows past the end read tensor 0, masked below
    tensor = entry >> 32
    row = tensor_table + tensor * ROW_WIDTH
    numel = tl.load(row + (ROW_WIDTH - 1))
    if ALIGNED:  # the mask is then constant over runs of ALIGN elements, so loads can be vectorised
        numel = tl.multiple_of(numel, ALIGN)
    offsets = (entry - (tensor << 32))[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = valid[:, None] & (offsets < numel[:, None])
    return row, offsets, mask


@triton.jit
def column_ptrs(row, index, offsets, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers [ROWS, BLOCK] to the tile's elements of the tensors in table column ``index``.

    The cast is spelled out per type because Triton 3.1's tl.pointer_type rejects a constexpr
    element type. The alignment hint sits on the cast itself: Triton 3.6 drops hints set on a
    helper's return value or on the integer before the cast."""
    address = tl.load(row + index)
    if DTYPE == tl.float32:
        base = address.to(tl.pointer_type(tl.float32))
    elif DTYPE == tl.float64:
        base = address.to(tl.pointer_type(tl.float64))
    elif DTYPE == tl.bfloat16:
        base = address.to(tl.pointer_type(tl.bfloat16))
    elif DTYPE == tl.float16:
        base = address.to(tl.pointer_type(tl.float16))
    elif DTYPE == tl.int16:
        base = address.to(tl.pointer_type(tl.int16))
    elif DTYPE == tl.int32:
        base = address.to(tl.pointer_type(tl.int32))
    else:
        tl.static_assert(DTYPE == tl.int64)
        base = address.to(tl.pointer_type(tl.int64))
    if ALIGNED:
        base = tl.multiple_of(base, 16)  # bytes
    return base[:, None] + offsets


@triton.jit
def load_column(row, index, offsets, mask, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tile's elements of table column ``index`` (element type ``DTYPE``) converted to ``COMPUTE``;
    masked lanes hold garbage that is never stored."""
    ptrs = column_ptrs(row, index, offsets, DTYPE, ALIGNED)
    if DTYPE == tl.bfloat16:
        # bf16 -> fp32 is a 16-bit shift; the interpreter's generic float conversion is far slower.
        bits = tl.load(ptrs.to(tl.pointer_type(tl.uint16)), mask=mask).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(COMPUTE)
    else:
        return tl.load(ptrs, mask=mask).to(COMPUTE)


@triton.jit
def load_coded_column(row, index, offsets, mask, code, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr):
    """:func:`load_column` with the column's dtype given by a runtime :data:`DTYPE_CODES` code."""
    if code == 0:
        x = load_column(row, index, offsets, mask, tl.float32, COMPUTE, ALIGNED)
    elif code == 1:
        x = load_column(row, index, offsets, mask, tl.float64, COMPUTE, ALIGNED)
    elif code == 2:
        x = load_column(row, index, offsets, mask, tl.bfloat16, COMPUTE, ALIGNED)
    else:
        x = load_column(row, index, offsets, mask, tl.float16, COMPUTE, ALIGNED)
    return x


@triton.jit
def scalar_weight(weight_bits, weight_ptr, HAS_WEIGHT_TENSOR: tl.constexpr, COMPUTE: tl.constexpr):
    """The lerp weight in the compute type: from the device tensor, else from the float64 bits."""
    if HAS_WEIGHT_TENSOR:
        weight = tl.load(weight_ptr).to(tl.float64)
    else:
        weight = weight_bits.to(tl.int64).to(tl.float64, bitcast=True)
    return weight.to(COMPUTE)


@triton.jit
def lerp_fma(a, s, w):
    """torch's lerp: |w| < 0.5 ? fma(w, s - a, a) : fma(w - 1, s - a, s)."""
    small = tl.abs(w) < 0.5
    return tl.fma(tl.where(small, w, w - 1.0), s - a, tl.where(small, a, s))


@triton.jit
def store_column(row, index, offsets, mask, value, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Store ``value`` into the tile's elements of table column ``index``, rounded once to ``DTYPE``
    (round to nearest even)."""
    ptrs = column_ptrs(row, index, offsets, DTYPE, ALIGNED)
    if DTYPE == tl.bfloat16:
        # Explicit RTNE on the bits, as c10::BFloat16 does: the interpreter's float->bf16 cast truncates.
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(ptrs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, value.to(DTYPE), mask=mask)


INTERPRETED: bool = isinstance(chunk_tile, InterpretedFunction)
"""True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""

# The interpreter pays per program and per numpy call, so it gets big tiles; a GPU
# wants tiles a thread block streams through with a few elements per thread.
TILE = 1 << 17 if INTERPRETED else 4096
MIN_BLOCK = 16 if INTERPRETED else 128
NUM_WARPS = 8
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)  # no contraction: match torch's roundings

_CACHE_ENTRIES = 64


@dataclass(frozen=True)
class Launch:
    """Device tables and tile shape for one launch over one group of tensors."""

    tensor_table: Tensor
    chunk_table: Tensor
    extras: Tensor
    n_chunks: int
    rows: int
    block: int
    aligned: bool

    @property
    def grid(self) -> Tuple[int]:
        return (triton.cdiv(self.n_chunks, self.rows),)


_launch_cache: "OrderedDict[tuple, Launch]" = OrderedDict()


def float_bits(value: float) -> int:
    """The float64 bit pattern of ``value`` as a signed int (Triton passes Python floats as fp32)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def compute_dtype(dtype: torch.dtype) -> "tl.dtype":
    """float64 for float64 averages/outputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def contiguous_operands(tensors: Sequence[Tensor], copy_backs: Optional[List[Tuple[Tensor, Tensor]]]) -> List[Tensor]:
    """Tensors the kernels can address as flat arrays.

    Non-contiguous tensors become contiguous temporaries; when ``copy_backs`` is a
    list (written operands) each (original, temporary) pair is recorded there for
    :func:`copy_back`. Read-only tensors of a dtype the kernels do not load (e.g.
    float8) are converted to float32, which holds their values exactly.
    """
    out = []
    for t in tensors:
        if copy_backs is None and t.dtype not in KERNEL_DTYPES:
            t = t.to(torch.float32, memory_format=torch.contiguous_format)
        elif not t.is_contiguous():
            temp = t.contiguous()
            if copy_backs is not None:
                copy_backs.append((t, temp))
            t = temp
        out.append(t)
    return out


def copy_back(copy_backs: Sequence[Tuple[Tensor, Tensor]]) -> None:
    """Write the temporaries made by :func:`contiguous_operands` back to their originals."""
    for original, temp in copy_backs:
        original.copy_(temp)


def group_positions(columns: Sequence[Sequence[Tensor]]) -> Dict[Tuple[torch.dtype, ...], List[int]]:
    """Positions of non-empty tensors, grouped by the tuple of their dtypes across ``columns``."""
    groups: Dict[Tuple[torch.dtype, ...], List[int]] = {}
    for i, first in enumerate(columns[0]):
        if first.numel():
            groups.setdefault(tuple(col[i].dtype for col in columns), []).append(i)
    return groups


def _block_size(sizes: np.ndarray) -> int:
    """A power of two near a quarter of the mean size: padding stays under ~25% of the elements
    and the chunk table near 5 entries per tensor, within [MIN_BLOCK, TILE]."""
    quarter_mean = max(1, int(sizes.sum()) // (4 * len(sizes)))
    return min(TILE, max(MIN_BLOCK, 1 << (quarter_mean.bit_length() - 1)))


def _upload(words: np.ndarray, device: torch.device) -> Tensor:
    host = torch.from_numpy(words)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # no host sync


def build_launch(columns: Sequence[Sequence[Tensor]], extras: Sequence[int] = ()) -> Launch:
    """Tables for one launch over ``columns`` (R lists of contiguous, non-empty tensors paired by
    position; numel is taken from the first list) plus int64 ``extras``.

    Cached by content (addresses, sizes, extras, device, stream): an identical call, as in a
    training loop, reuses the device tables without building or uploading anything.
    """
    device = columns[0][0].device
    n = len(columns[0])
    words = np.empty((n, len(columns) + 1), dtype=np.int64)
    for r, col in enumerate(columns):
        words[:, r] = [t.data_ptr() for t in col]
    words[:, -1] = [t.numel() for t in columns[0]]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, words.shape[1], words.tobytes(), tuple(extras))
    cached = _launch_cache.get(key)
    if cached is not None:
        _launch_cache.move_to_end(key)
        return cached

    sizes = words[:, -1]
    block = _block_size(sizes)
    counts = (sizes + block - 1) // block
    n_chunks = int(counts.sum())
    first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
    chunks = (np.repeat(np.arange(n, dtype=np.int64), counts) << 32) | (np.arange(n_chunks) - first_chunk)
    sections = [words.reshape(-1), chunks, np.asarray(extras, dtype=np.int64)]
    bounds = np.cumsum([0] + [len(s) + len(s) % 2 for s in sections])  # 16-byte aligned sections
    buffer = np.zeros(int(bounds[-1]), dtype=np.int64)
    for section, start in zip(sections, bounds):
        buffer[start:start + len(section)] = section
    device_buffer = _upload(buffer, device)
    tensor_table, chunk_table, extras_table = (
        device_buffer[bounds[i]:bounds[i] + len(s)] for i, s in enumerate(sections))
    aligned = bool((words[:, :-1] % 16 == 0).all() and (sizes % ALIGN.value == 0).all())
    launch = Launch(tensor_table, chunk_table, extras_table, n_chunks, TILE // block, block, aligned)
    _launch_cache[key] = launch
    if len(_launch_cache) > _CACHE_ENTRIES:
        _launch_cache.popitem(last=False)
    return launch
