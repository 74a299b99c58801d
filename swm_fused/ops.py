"""The functional ops contract: validate every argument, then dispatch.

All ops work in place on lists of tensors paired by position (a single tensor or
a :class:`~swm_fused.FlatBuffer` may stand in for a list). Nothing is written
until every check has passed, so a bad call leaves all tensors unchanged.

The per-tensor checks (dtypes, shapes, devices) cost about as much as a fused
kernel on thousands of small tensors, so a backend module that declares
``VALIDATES_LISTS = True`` runs them itself, in the same order and with the same
messages as :func:`_check_lists` minus the op's name, which :func:`_call` adds.
Everything else (list lengths, numbers, flags, FlatBuffer layouts) is checked
here for every backend, before any per-tensor check.
"""
from __future__ import annotations

import itertools
import math
import numbers
from types import ModuleType
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import dispatch
from .flat import FlatBuffer

TensorList = Union[Tensor, Sequence[Tensor], FlatBuffer]

AVERAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _as_list(op: str, name: str, value: TensorList) -> List[Tensor]:
    if isinstance(value, FlatBuffer):
        return value.views
    if isinstance(value, Tensor):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a Tensor, a list of Tensors or a FlatBuffer, "
                        f"got {type(value).__name__}")
    if not all(map(isinstance, value, itertools.repeat(Tensor))):  # C-speed scan; find the culprit below
        i, t = next((i, t) for i, t in enumerate(value) if not isinstance(t, Tensor))
        raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")
    return list(value)


def _check_lengths(op: str, named: Sequence[Tuple[str, Sequence[Tensor]]]) -> None:
    first_name, first = named[0]
    for name, tensors in named[1:]:
        if len(tensors) != len(first):
            raise ValueError(f"{op}: {first_name} has {len(first)} tensors but {name} has {len(tensors)}")


def _check_lists(op: str, named: Sequence[Tuple[str, Sequence[Tensor]]], written: Sequence[str], *,
                 any_dtype: bool = False, indices: Optional[Sequence[int]] = None) -> None:
    """Check lengths, then list by list and position by position: dtype, shape, device.

    Written lists need float32/float64/bfloat16/float16, the others a floating dtype
    (``any_dtype`` lifts both); shapes and the device must match the first list's.
    ``indices[j]`` is the index that position j reports (default j). csrc/validate.h
    is the C++ twin of this function: keep the two in step.
    """
    _check_lengths(op, named)
    first_name, first = named[0]
    if not first:
        return
    device = first[0].device
    for name, tensors in named:
        for j, t in enumerate(tensors):
            i = j if indices is None else indices[j]
            if not any_dtype and name in written and t.dtype not in AVERAGE_DTYPES:
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; averages and outputs must be "
                                "float32, float64, bfloat16 or float16")
            if not any_dtype and not t.is_floating_point():
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; sources must be floating point")
            if t.shape != first[j].shape:
                raise ValueError(f"{op}: shape mismatch at index {i}: {first_name}[{i}] has shape "
                                 f"{tuple(first[j].shape)} but {name}[{i}] has shape {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {first_name}[0] is on {device}; "
                                 "all tensors must be on one device")


def _checked_backend(op: str, named: Sequence[Tuple[str, TensorList, List[Tensor]]], written: Sequence[str],
                     device: torch.device, *, any_dtype: bool = False) -> Tuple[ModuleType, List[List[Tensor]]]:
    """The backend for ``device`` and the lists to hand it, with every per-tensor check done.

    ``named`` holds (name, argument, its tensors), lengths already checked. When every
    argument is a FlatBuffer of one layout, the storages stand in for the views: they are
    checked here (a few tensors), each reporting the index of its first view. Otherwise the
    tensors are checked here unless the backend checks them itself.
    """
    backend = dispatch.select(device)
    storages = _flat_storages([arg for _, arg, _ in named])
    if storages is not None:
        group_of = named[0][1].group_of
        first_views = [group_of.index(g) for g in range(len(storages[0]))]
        _check_lists(op, [(name, s) for (name, _, _), s in zip(named, storages)], written,
                     any_dtype=any_dtype, indices=first_views)
        return backend, storages
    lists = [tensors for _, _, tensors in named]
    if not getattr(backend, "VALIDATES_LISTS", False):
        _check_lists(op, [(name, tensors) for name, _, tensors in named], written, any_dtype=any_dtype)
    return backend, lists


def _call(op: str, backend: ModuleType, primitive: str, *args: Any) -> Any:
    """``backend.primitive(*args)`` without autograd; a self-validating backend's message gets ``op: ``."""
    try:
        with torch.no_grad():
            return getattr(backend, primitive)(*args)
    except (ValueError, TypeError) as exc:
        if not getattr(backend, "VALIDATES_LISTS", False):
            raise
        raise type(exc)(f"{op}: {exc}") from None


def _check_found_inf(op: str, found_inf: Optional[Tensor], device: Optional[torch.device]) -> Optional[Tensor]:
    if found_inf is None:
        return None
    if not isinstance(found_inf, Tensor):
        raise TypeError(f"{op}: found_inf must be a Tensor or None, got {type(found_inf).__name__}")
    if found_inf.numel() != 1:
        raise ValueError(f"{op}: found_inf must hold exactly one element, got shape {tuple(found_inf.shape)}")
    if device is not None and found_inf.device != device:
        raise ValueError(f"{op}: found_inf is on {found_inf.device} but the tensors are on {device}")
    return found_inf.reshape(()).to(torch.float32)


def _check_number(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def _flat_storages(lists: Sequence[TensorList]) -> Optional[List[List[Tensor]]]:
    """When every list is a FlatBuffer with one layout, their storages, paired; else None."""
    if not all(isinstance(x, FlatBuffer) for x in lists):
        return None
    keys = {x.layout_key() for x in lists}
    if len(keys) != 1:
        return None
    return [x.storages for x in lists]


def _swa_weight(op: str, n_averaged, device: Optional[torch.device]) -> Tuple[float, Optional[Tensor]]:
    """SWA's weight 1/(n+1): a float for an int count, a float64 device tensor for a tensor count."""
    if isinstance(n_averaged, Tensor):
        if n_averaged.numel() != 1:
            raise ValueError(f"{op}: n_averaged must hold one element, got shape {tuple(n_averaged.shape)}")
        if device is not None and n_averaged.device != device:
            n_averaged = n_averaged.to(device)
        return 0.0, 1.0 / (n_averaged.reshape(()).to(torch.float64) + 1.0)
    if isinstance(n_averaged, bool) or not isinstance(n_averaged, numbers.Integral):
        raise TypeError(f"{op}: n_averaged must be an int or a Tensor, got {type(n_averaged).__name__}")
    if n_averaged < 0:
        raise ValueError(f"{op}: n_averaged must be >= 0, got {n_averaged}")
    return 1.0 / (int(n_averaged) + 1), None


def _first_device(tensors: List[Tensor]) -> Optional[torch.device]:
    """The device of the first tensor, which picks the backend; None for an empty list."""
    return tensors[0].device if tensors else None


def ema_(avg: TensorList, src: TensorList, decay: float, *, found_inf: Optional[Tensor] = None) -> None:
    """Exponential moving average, in place: ``avg = decay * avg + (1 - decay) * src``.

    Computed as ``lerp(avg, src, 1 - decay)``, exactly like ``torch._foreach_lerp_``,
    in float32 (float64 for float64 averages), rounding once at the store. ``src``
    may have any floating dtype. If ``found_inf`` (a one-element device tensor) is
    non-zero, nothing changes; it is read on the device, never synchronised.
    """
    avgs, srcs = _as_list("ema_", "avg", avg), _as_list("ema_", "src", src)
    _check_lengths("ema_", [("avg", avgs), ("src", srcs)])
    decay = _check_number("ema_", "decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_: decay must be in [0, 1], got {decay}")
    device = _first_device(avgs)
    found_inf = _check_found_inf("ema_", found_inf, device)
    if device is None:
        return
    backend, (avgs, srcs) = _checked_backend("ema_", [("avg", avg, avgs), ("src", src, srcs)], ("avg",), device)
    _call("ema_", backend, "lerp_", avgs, srcs, 1.0 - decay, None, found_inf)


def swa_(avg: TensorList, src: TensorList, n_averaged: Union[int, Tensor], *,
         found_inf: Optional[Tensor] = None) -> None:
    """Equal-weight running mean, in place: ``avg += (src - avg) / (n_averaged + 1)``.

    ``n_averaged`` counts the models already in ``avg``: 0 makes this a copy. It may
    be an int or a one-element tensor on the average's device (no host sync).
    Computed as ``lerp(avg, src, 1 / (n_averaged + 1))``, like torch's SWA.
    """
    avgs, srcs = _as_list("swa_", "avg", avg), _as_list("swa_", "src", src)
    _check_lengths("swa_", [("avg", avgs), ("src", srcs)])
    device = _first_device(avgs)
    weight, weight_tensor = _swa_weight("swa_", n_averaged, device)
    found_inf = _check_found_inf("swa_", found_inf, device)
    if device is None:
        return
    backend, (avgs, srcs) = _checked_backend("swa_", [("avg", avg, avgs), ("src", src, srcs)], ("avg",), device)
    _call("swa_", backend, "lerp_", avgs, srcs, weight, weight_tensor, found_inf)


def swag_(mean: TensorList, sq_mean: TensorList, src: TensorList, n_averaged: Union[int, Tensor], *,
          found_inf: Optional[Tensor] = None) -> None:
    """SWAG's first and second moments in one pass over memory, in place.

    ``mean += (src - mean) / (n+1)`` and ``sq_mean += (src**2 - sq_mean) / (n+1)``,
    with ``n = n_averaged`` (an int or a one-element device tensor).
    """
    means = _as_list("swag_", "mean", mean)
    sq_means = _as_list("swag_", "sq_mean", sq_mean)
    srcs = _as_list("swag_", "src", src)
    _check_lengths("swag_", [("mean", means), ("sq_mean", sq_means), ("src", srcs)])
    device = _first_device(means)
    weight, weight_tensor = _swa_weight("swag_", n_averaged, device)
    found_inf = _check_found_inf("swag_", found_inf, device)
    if device is None:
        return
    named = [("mean", mean, means), ("sq_mean", sq_mean, sq_means), ("src", src, srcs)]
    backend, (means, sq_means, srcs) = _checked_backend("swag_", named, ("mean", "sq_mean"), device)
    _call("swag_", backend, "swag_", means, sq_means, srcs, weight, weight_tensor, found_inf)


def merge_(out: TensorList, inputs: Sequence[TensorList], weights: Union[Sequence[float], Tensor]) -> None:
    """K-way weighted merge, in place: ``out = sum_k weights[k] * inputs[k]``.

    ``inputs`` is a sequence of K tensor lists, each paired with ``out`` by position.
    ``out`` may be one of the inputs (the merge then runs in place). Accumulates in
    float32 (float64 for float64 outputs) and rounds once at the store.
    """
    outs = _as_list("merge_", "out", out)
    if isinstance(inputs, (Tensor, FlatBuffer)) or not isinstance(inputs, (list, tuple)):
        raise TypeError("merge_: inputs must be a list of K tensor lists (one per model)")
    if len(inputs) == 0:
        raise ValueError("merge_: inputs is empty; give at least one model")
    input_lists = [_as_list("merge_", f"inputs[{k}]", x) for k, x in enumerate(inputs)]
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"merge_: weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != len(input_lists):
        raise ValueError(f"merge_: got {len(weights)} weights for {len(input_lists)} input lists")
    weights = [_check_number("merge_", f"weights[{k}]", w) for k, w in enumerate(weights)]
    named = [("out", out, outs)] + [(f"inputs[{k}]", x, xs) for k, (x, xs) in enumerate(zip(inputs, input_lists))]
    _check_lengths("merge_", [(name, tensors) for name, _, tensors in named])
    device = _first_device(outs)
    if device is None:
        return
    backend, (outs, *input_lists) = _checked_backend("merge_", named, ("out",), device)
    _call("merge_", backend, "merge_", outs, input_lists, weights)


def any_nonfinite(tensors: TensorList) -> Tensor:
    """A 0-dim float32 tensor on the tensors' device: 1.0 if any element is NaN or Inf, else 0.0.

    Tensors of other dtypes cannot hold NaN/Inf and are skipped, but all must share one
    device. Never synchronises with the host; pass the result as ``found_inf`` to skip a step.
    """
    tensor_list = _as_list("any_nonfinite", "tensors", tensors)
    device = _first_device(tensor_list)
    if device is None:
        return torch.zeros((), dtype=torch.float32)
    backend, (tensor_list,) = _checked_backend("any_nonfinite", [("tensors", tensors, tensor_list)], (), device,
                                         any_dtype=True)
    if not getattr(backend, "VALIDATES_LISTS", False):  # such backends skip the other dtypes themselves
        tensor_list = [t for t in tensor_list if t.is_floating_point()]
        if not tensor_list:
            return torch.zeros((), dtype=torch.float32, device=device)
    return _call("any_nonfinite", backend, "any_nonfinite", tensor_list)
