"""FlatBuffer: a set of tensors laid out in one contiguous 1-D storage per (device, dtype)."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# Every view starts at a multiple of 16 elements: buffers of different dtypes built
# from the same tensors then share one element layout (so ops can pair their
# storages directly), and fp32/bf16/fp16 views stay 16-byte aligned for vector loads.
ALIGN_ELEMENTS = 16

_Spec = Tuple[torch.Size, torch.dtype, torch.device]
_LAYOUT_IDS: Dict[Tuple, int] = {}  # every layout seen -> its id (FlatBuffer.layout_key)


def _round_up(n: int) -> int:
    return (n + ALIGN_ELEMENTS - 1) // ALIGN_ELEMENTS * ALIGN_ELEMENTS


class FlatBuffer:
    """Tensors stored back to back in one flat storage per (device, dtype).

    ``views[i]`` is shaped like the i-th original tensor and lives inside
    ``storages[group_of[i]]``. When every list given to an op is a FlatBuffer with
    the same layout, the op runs once per storage instead of once per tensor.

    Build one with :meth:`from_tensors` (copies the values in) or :meth:`zeros_like`;
    ``pin_memory=True`` puts host storages in page-locked memory (needs CUDA).
    Padding between views is zero-filled and only ever holds zeros or values the
    ops derive from zeros, so it never carries NaN/Inf of its own.
    """

    def __init__(self, specs: Sequence[_Spec], *, pin_memory: bool = False):
        group_index: Dict[Tuple[torch.device, torch.dtype], int] = {}
        sizes: List[int] = []
        self.group_of: List[int] = []
        self.offsets: List[int] = []
        self.shapes: List[torch.Size] = []
        for shape, dtype, device in specs:
            key = (torch.device(device), dtype)
            if key not in group_index:
                group_index[key] = len(sizes)
                sizes.append(0)
            g = group_index[key]
            self.group_of.append(g)
            self.offsets.append(sizes[g])
            self.shapes.append(torch.Size(shape))
            sizes[g] += _round_up(torch.Size(shape).numel())
        # page-locked host storages let device<->host copies run asynchronously
        self.storages: List[Tensor] = [
            torch.zeros(size, dtype=dtype, device=device, pin_memory=pin_memory and device.type == "cpu")
            for (device, dtype), size in zip(group_index, sizes)
        ]
        self.views: List[Tensor] = [
            self.storages[g].narrow(0, off, shape.numel()).view(shape)
            for g, off, shape in zip(self.group_of, self.offsets, self.shapes)
        ]

    @classmethod
    def from_tensors(cls, tensors: Union[Tensor, Sequence[Tensor]], dtype: Optional[torch.dtype] = None,
                     device: Optional[Union[str, torch.device]] = None, *, pin_memory: bool = False) -> "FlatBuffer":
        """A FlatBuffer holding copies of ``tensors``, cast to ``dtype`` / moved to ``device`` if given."""
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        buf = cls.zeros_like(tensors, dtype=dtype, device=device, pin_memory=pin_memory)
        buf.copy_(tensors)
        return buf

    @classmethod
    def zeros_like(cls, tensors: Union["FlatBuffer", Tensor, Sequence[Tensor]], dtype: Optional[torch.dtype] = None,
                   device: Optional[Union[str, torch.device]] = None, *, pin_memory: bool = False) -> "FlatBuffer":
        """A zero-filled FlatBuffer shaped like ``tensors`` (a list or another FlatBuffer)."""
        if isinstance(tensors, FlatBuffer):
            tensors = tensors.views
        elif isinstance(tensors, Tensor):
            tensors = [tensors]
        specs = [(t.shape, dtype or t.dtype, torch.device(device) if device is not None else t.device)
                 for t in tensors]
        return cls(specs, pin_memory=pin_memory)

    @torch.no_grad()
    def copy_(self, tensors: Union["FlatBuffer", Sequence[Tensor]]) -> "FlatBuffer":
        """Copy values from ``tensors`` (paired by position) into the views; returns self."""
        src = tensors.views if isinstance(tensors, FlatBuffer) else list(tensors)
        if len(src) != len(self.views):
            raise ValueError(f"FlatBuffer.copy_: got {len(src)} tensors for {len(self.views)} views")
        for i, (view, t) in enumerate(zip(self.views, src)):
            if t.shape != view.shape:
                raise ValueError(f"FlatBuffer.copy_: tensor {i} has shape {tuple(t.shape)}, "
                                 f"view has {tuple(view.shape)}")
        if self.views:
            torch._foreach_copy_(self.views, [t.detach() for t in src])
        return self

    def layout_key(self) -> int:
        """Equal keys mean the storages pair element by element, whatever their dtypes.

        The layout is fixed at construction, so the key is computed once: a small int naming the
        layout (equal layouts get equal ints), cheap to compare on every op call.
        """
        key = self.__dict__.get("_layout_id")
        if key is None:
            layout = (tuple(self.shapes), tuple(self.group_of), tuple(self.offsets))
            key = self.__dict__["_layout_id"] = _LAYOUT_IDS.setdefault(layout, len(_LAYOUT_IDS))
        return key

    def views_of(self, flat: Tensor, group: int = 0) -> List[Tensor]:
        """Views of ``flat`` (a 1-D tensor shaped like ``storages[group]``, or a ``[..., n]`` tensor whose
        last dim is) laid out like this buffer's views of that storage: one per tensor of the group."""
        if flat.shape[-1] != self.storages[group].numel():
            raise ValueError(f"FlatBuffer.views_of: got {flat.shape[-1]} elements, storage {group} holds "
                             f"{self.storages[group].numel()}")
        lead = tuple(flat.shape[:-1])
        return [flat.narrow(-1, off, shape.numel()).view(*lead, *shape)
                for g, off, shape in zip(self.group_of, self.offsets, self.shapes) if g == group]

    def like(self, storages: Sequence[Tensor]) -> "FlatBuffer":
        """A FlatBuffer with this layout over existing ``storages`` (one per group, same sizes, any
        dtypes): ops pair it with this buffer storage by storage. No copy."""
        storages = list(storages)
        if len(storages) != len(self.storages) or any(
                s.dim() != 1 or s.numel() != t.numel() for s, t in zip(storages, self.storages)):
            raise ValueError("FlatBuffer.like: storages must be 1-D and sized like this buffer's")
        out = FlatBuffer.__new__(FlatBuffer)
        out.group_of, out.offsets, out.shapes = list(self.group_of), list(self.offsets), list(self.shapes)
        out.storages = storages
        out.views = [storages[g].narrow(0, off, shape.numel()).view(shape)
                     for g, off, shape in zip(self.group_of, self.offsets, self.shapes)]
        return out

    def pack(self, flat: Tensor, group: int = 0) -> Tensor:
        """``flat`` laid out like ``storages[group]`` (last dim), with the padding dropped: the group's
        tensors back to back (a new tensor)."""
        return torch.cat([v.flatten(len(flat.shape) - 1) for v in self.views_of(flat, group)], dim=-1)

    @torch.no_grad()
    def unpack_(self, flat: Tensor, packed: Tensor, group: int = 0) -> Tensor:
        """The inverse of :meth:`pack`: copy ``packed`` into the views of ``flat``; returns ``flat``."""
        start = 0
        for view in self.views_of(flat, group):
            size = view.shape[len(flat.shape) - 1:].numel()
            view.copy_(packed.narrow(-1, start, size).view(view.shape))
            start += size
        if start != packed.shape[-1]:
            raise ValueError(f"FlatBuffer.unpack_: got {packed.shape[-1]} packed elements, expected {start}")
        return flat

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.views)

    def __getitem__(self, index: int) -> Tensor:
        return self.views[index]

    def numel(self) -> int:
        """Elements held by the views (padding excluded)."""
        return sum(shape.numel() for shape in self.shapes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the storages (padding included)."""
        return sum(s.numel() * s.element_size() for s in self.storages)

    def __repr__(self) -> str:
        groups = ", ".join(f"{s.dtype}@{s.device}[{s.numel()}]" for s in self.storages)
        return f"FlatBuffer({len(self.views)} tensors, {groups})"
