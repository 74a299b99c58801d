"""The functional ops contract: validate every argument, then dispatch.

All ops work in place on lists of tensors paired by position (a single tensor or
a :class:`~swm_fused.FlatBuffer` may stand in for a list). Nothing is written
until every check has passed, so a bad call leaves all tensors unchanged.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

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
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")
    return list(value)


def _check_lists(op: str, named: Sequence[Tuple[str, List[Tensor]]], written: Sequence[str]) -> Optional[torch.device]:
    """Check lengths, shapes, dtypes and devices; return the common device (None if empty)."""
    first_name, first = named[0]
    for name, tensors in named[1:]:
        if len(tensors) != len(first):
            raise ValueError(f"{op}: {first_name} has {len(first)} tensors but {name} has {len(tensors)}")
    device = None
    for name, tensors in named:
        for i, t in enumerate(tensors):
            if name in written and t.dtype not in AVERAGE_DTYPES:
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; averages and outputs must be "
                                "float32, float64, bfloat16 or float16")
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; sources must be floating point")
            if t.shape != first[i].shape:
                raise ValueError(f"{op}: shape mismatch at index {i}: {first_name}[{i}] has shape "
                                 f"{tuple(first[i].shape)} but {name}[{i}] has shape {tuple(t.shape)}")
            if device is None:
                device, device_where = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {device_where} is on {device}; "
                                 "all tensors must be on one device")
    return device


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


def ema_(avg: TensorList, src: TensorList, decay: float, *, found_inf: Optional[Tensor] = None) -> None:
    """Exponential moving average, in place: ``avg = decay * avg + (1 - decay) * src``.

    Computed as ``lerp(avg, src, 1 - decay)``, exactly like ``torch._foreach_lerp_``,
    in float32 (float64 for float64 averages), rounding once at the store. ``src``
    may have any floating dtype. If ``found_inf`` (a one-element device tensor) is
    non-zero, nothing changes; it is read on the device, never synchronised.
    """
    avgs, srcs = _as_list("ema_", "avg", avg), _as_list("ema_", "src", src)
    device = _check_lists("ema_", [("avg", avgs), ("src", srcs)], written=("avg",))
    decay = _check_number("ema_", "decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_: decay must be in [0, 1], got {decay}")
    found_inf = _check_found_inf("ema_", found_inf, device)
    if device is None:
        return
    flat = _flat_storages([avg, src])
    if flat is not None:
        avgs, srcs = flat
    with torch.no_grad():
        dispatch.select(device).lerp_(avgs, srcs, 1.0 - decay, None, found_inf)


def swa_(avg: TensorList, src: TensorList, n_averaged: Union[int, Tensor], *,
         found_inf: Optional[Tensor] = None) -> None:
    """Equal-weight running mean, in place: ``avg += (src - avg) / (n_averaged + 1)``.

    ``n_averaged`` counts the models already in ``avg``: 0 makes this a copy. It may
    be an int or a one-element tensor on the average's device (no host sync).
    Computed as ``lerp(avg, src, 1 / (n_averaged + 1))``, like torch's SWA.
    """
    avgs, srcs = _as_list("swa_", "avg", avg), _as_list("swa_", "src", src)
    device = _check_lists("swa_", [("avg", avgs), ("src", srcs)], written=("avg",))
    weight, weight_tensor = _swa_weight("swa_", n_averaged, device)
    found_inf = _check_found_inf("swa_", found_inf, device)
    if device is None:
        return
    flat = _flat_storages([avg, src])
    if flat is not None:
        avgs, srcs = flat
    with torch.no_grad():
        dispatch.select(device).lerp_(avgs, srcs, weight, weight_tensor, found_inf)


def swag_(mean: TensorList, sq_mean: TensorList, src: TensorList, n_averaged: Union[int, Tensor], *,
          found_inf: Optional[Tensor] = None) -> None:
    """SWAG's first and second moments in one pass over memory, in place.

    ``mean += (src - mean) / (n+1)`` and ``sq_mean += (src**2 - sq_mean) / (n+1)``,
    with ``n = n_averaged`` (an int or a one-element device tensor).
    """
    means = _as_list("swag_", "mean", mean)
    sq_means = _as_list("swag_", "sq_mean", sq_mean)
    srcs = _as_list("swag_", "src", src)
    device = _check_lists("swag_", [("mean", means), ("sq_mean", sq_means), ("src", srcs)],
                          written=("mean", "sq_mean"))
    weight, weight_tensor = _swa_weight("swag_", n_averaged, device)
    found_inf = _check_found_inf("swag_", found_inf, device)
    if device is None:
        return
    flat = _flat_storages([mean, sq_mean, src])
    if flat is not None:
        means, sq_means, srcs = flat
    with torch.no_grad():
        dispatch.select(device).swag_(means, sq_means, srcs, weight, weight_tensor, found_inf)


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
    named = [("out", outs)] + [(f"inputs[{k}]", x) for k, x in enumerate(input_lists)]
    device = _check_lists("merge_", named, written=("out",))
    if device is None:
        return
    flat = _flat_storages([out, *inputs])
    if flat is not None:
        outs, input_lists = flat[0], flat[1:]
    with torch.no_grad():
        dispatch.select(device).merge_(outs, input_lists, weights)


def any_nonfinite(tensors: TensorList) -> Tensor:
    """A 0-dim float32 tensor on the tensors' device: 1.0 if any element is NaN or Inf, else 0.0.

    Never synchronises with the host; pass the result as ``found_inf`` to skip a step.
    """
    lists = _as_list("any_nonfinite", "tensors", tensors)
    if isinstance(tensors, FlatBuffer):
        lists = tensors.storages
    lists = [t for t in lists if t.is_floating_point()]  # other dtypes cannot hold NaN/Inf
    device = _check_lists("any_nonfinite", [("tensors", lists)], written=())
    if device is None:
        return torch.zeros((), dtype=torch.float32)
    return dispatch.select(device).any_nonfinite(lists)
