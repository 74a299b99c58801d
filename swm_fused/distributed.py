"""torch.distributed support: SWM across ranks, broadcasting an average, and DTensor (FSDP2) shards.

These functions run inside the user's own process group (NCCL on GPUs, gloo on CPU);
swm_fused adds no communication engine of its own. Each collective call first
gathers a small signature (tensor count, shapes, dtypes, weight) from every rank,
so ranks that disagree all raise the same ``ValueError`` instead of hanging or
reducing garbage.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .flat import FlatBuffer
from .ops import merge_

TensorList = Union[Tensor, Sequence[Tensor], FlatBuffer]
_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)


def dtensor_type() -> Optional[type]:
    """``torch.distributed.tensor.DTensor``, or None where torch.distributed is not built in."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor (an FSDP2 / tensor-parallel shard)."""
    if type(value) in _PLAIN_TENSOR_TYPES:  # the common case, checked without an import
        return False
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def local_shard(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: ``to_local()`` for a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def fsdp_modules(model: object) -> List[nn.Module]:
    """The FSDP2 (``fully_shard``) modules inside ``model``."""
    if not isinstance(model, nn.Module) or not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import FSDPModule
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard_fsdp(modules: Sequence[nn.Module]) -> None:
    """Put FSDP2's sharded parameters back in place (local, no communication).

    After a forward without backward FSDP2 keeps the root's parameters unsharded
    and the next forward reuses them, so writes into the shards would go unseen.
    """
    for module in modules:
        module.reshard()


def _as_list(tensors: TensorList) -> List[Tensor]:
    if isinstance(tensors, FlatBuffer):
        return tensors.views
    if isinstance(tensors, Tensor):
        return [tensors]
    return [local_shard(t) for t in tensors]


def _signature(tensors: List[Tensor]) -> List[Tuple[Tuple[int, ...], str]]:
    return [(tuple(t.shape), str(t.dtype)) for t in tensors]


def _check_agreement(op: str, tensors: List[Tensor], extra, group) -> List:
    """All-gather (signature, extra) and raise the same error on every rank if signatures differ."""
    world = dist.get_world_size(group)
    gathered: List = [None] * world
    dist.all_gather_object(gathered, (_signature(tensors), extra), group=group)
    reference_sig = gathered[0][0]
    for rank, (sig, _) in enumerate(gathered):
        if len(sig) != len(reference_sig):
            raise ValueError(f"{op}: rank {rank} has {len(sig)} tensors but rank 0 has {len(reference_sig)}")
        for i, (mine, theirs) in enumerate(zip(sig, reference_sig)):
            if mine != theirs:
                raise ValueError(f"{op}: tensor {i} is {theirs[1]} {list(theirs[0])} on rank 0 but "
                                 f"{mine[1]} {list(mine[0])} on rank {rank}; all ranks must hold the same model")
    return [extra for _, extra in gathered]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_across_ranks_(tensors: TensorList, weight: float, group: Optional[dist.ProcessGroup] = None) -> None:
    """SWM across ranks, in place: afterwards every rank holds ``sum_r w_r * theta_r / sum_r w_r``.

    Each rank passes its own trajectory's average (a list of tensors, DTensor shards or a
    FlatBuffer) and its weight ``w_r >= 0``. The tensors are packed, already weighted, into
    one flat float32 buffer (float64 for float64 tensors) with the rank's weight appended,
    so a whole model costs one all-reduce per accumulation dtype, and bf16 models are
    accumulated in fp32. Ranks whose shapes, dtypes or weights disagree all raise.
    """
    op = "merge_across_ranks_"
    if isinstance(weight, Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        weight = float("nan")  # still join the signature exchange, so every rank raises together
    tensors = _as_list(tensors)
    weights = _check_agreement(op, tensors, weight, group)
    bad = [r for r, w in enumerate(weights) if not w >= 0]  # NaN marks an invalid weight
    if bad:
        raise ValueError(f"{op}: rank {bad[0]} gave weight {weights[bad[0]]}; weights must be finite and >= 0")
    if sum(weights) <= 0:
        raise ValueError(f"{op}: the weights of all ranks sum to {sum(weights)}; at least one must be positive")

    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(_accumulate_dtype(t.dtype), []).append(i)
    for acc_dtype, indices in groups.items():
        members = [tensors[i] for i in indices]
        packed = torch.empty(sum(t.numel() for t in members) + 1, dtype=acc_dtype, device=members[0].device)
        views = _views_of(packed, members)
        merge_(views, [members], [float(weight)])  # weighted copy-in, fp32 accumulation for low precision
        packed[-1] = float(weight)
        dist.all_reduce(packed, group=group)
        total = packed[-1].item()
        merge_(members, [views], [1.0 / total])


def broadcast_average_(tensors: TensorList, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Copy rank ``src``'s tensors into every rank's, in place (one broadcast per dtype).

    For the case where one rank owns the average. Shapes and dtypes are checked on
    every rank first; a mismatch raises the same ``ValueError`` everywhere.
    """
    tensors = _as_list(tensors)
    _check_agreement("broadcast_average_", tensors, None, group)
    groups: Dict[torch.dtype, List[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    src_global = src if group is None else dist.get_global_rank(group, src)
    for dtype, members in groups.items():
        packed = torch.empty(sum(t.numel() for t in members), dtype=dtype, device=members[0].device)
        views = _views_of(packed, members)
        torch._foreach_copy_(views, members)
        dist.broadcast(packed, src=src_global, group=group)
        torch._foreach_copy_(members, views)


def _views_of(packed: Tensor, like: List[Tensor]) -> List[Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(packed.narrow(0, offset, t.numel()).view(t.shape))
        offset += t.numel()
    return views
