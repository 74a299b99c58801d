"""Shared pieces of :mod:`swm_fused.merge`: types, errors, dtype names and layout checks."""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..ops import AVERAGE_DTYPES

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, Tensor]
DTypeLike = Union[torch.dtype, str, None]

# Names accepted wherever a merge dtype is given (library, --dtype, a config's dtype/out_dtype).
DTYPE_NAMES: Dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
}
SHORT_DTYPE_NAMES = ("fp32", "bf16", "fp16", "fp64")  # what the command line offers


class MergeParameterError(ValueError):
    """The merge was asked for with a bad method, parameter or combination of them.

    Raised before any file is read or written. ``swm-fused merge`` reports it as a usage
    error (exit status 2); it is a ValueError, so ``except ValueError`` catches it too.
    """


class MergeConfigError(MergeParameterError):
    """A merge config (YAML) is not valid YAML or not a valid merge description."""


class TensorInfo(NamedTuple):
    """What validation needs to know about a tensor before reading its data."""
    shape: Tuple[int, ...]
    dtype: torch.dtype


def parse_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """None, a torch float dtype, or one of the names fp32/bf16/fp16/fp64 (and their long forms)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16, fp64 "
                             "(or float32, bfloat16, float16, float64)")
        return DTYPE_NAMES[dtype.lower()]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name such as 'bf16', got {type(dtype).__name__}")
    if dtype not in AVERAGE_DTYPES:
        raise TypeError(f"dtype {dtype} cannot hold a merge; use float32, float64, bfloat16 or float16")
    return dtype


def as_numbers(what: str, values: Union[Sequence[float], Tensor]) -> List[float]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of numbers, got {type(values).__name__}")
    numbers_ = []
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{what}[{k}] must be a real number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{what}[{k}] must be finite, got {value}")
        numbers_.append(float(value))
    return numbers_


def resolve_weights(weights: Optional[Union[Sequence[float], Tensor]], count: int, normalize: bool) -> List[float]:
    """Uniform weights when None; otherwise check the count and, with ``normalize``, scale to sum 1."""
    if weights is None:
        return [1.0 / count] * count
    resolved = as_numbers("weights", weights)
    if len(resolved) != count:
        raise MergeParameterError(f"got {len(resolved)} weights for {count} models; give one weight per model")
    if normalize:
        resolved = normalized(resolved)
    return resolved


def normalized(weights: Sequence[float]) -> List[float]:
    total = math.fsum(weights)
    if abs(total) <= 1e-12 * math.fsum(abs(w) for w in weights):
        raise MergeParameterError(f"weights {list(weights)} sum to 0 and cannot be normalized; "
                                  "pass normalize=False (--no-normalize) to use them as given")
    return [w / total for w in weights]


def name_list(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_same_layout(labels: Sequence[str], infos: Sequence[Mapping[str, TensorInfo]]) -> None:
    """Raise one ValueError naming the first model whose keys, shapes or kinds differ from model 0."""
    reference = infos[0]
    for label, info in zip(labels[1:], infos[1:]):
        if info.keys() != reference.keys():
            missing = [k for k in reference if k not in info]
            extra = [k for k in info if k not in reference]
            parts = ([f"lacks {name_list(missing)}"] if missing else []) + \
                    ([f"has extra {name_list(extra)}"] if extra else [])
            raise ValueError(f"{label} does not hold the same tensors as {labels[0]}: it " + " and ".join(parts))
    for key, ref in reference.items():
        for label, info in zip(labels[1:], infos[1:]):
            other = info[key]
            if other.shape != ref.shape:
                raise ValueError(f"shape mismatch for tensor {key!r}: {labels[0]} has {list(ref.shape)} "
                                 f"but {label} has {list(other.shape)}")
            if other.dtype.is_floating_point != ref.dtype.is_floating_point:
                raise ValueError(f"dtype mismatch for tensor {key!r}: {labels[0]} has {ref.dtype} but {label} "
                                 f"has {other.dtype}; floating tensors merge, others are copied from the first")


def output_dtypes(first: Mapping[str, TensorInfo], dtype: Optional[torch.dtype], label: str) -> Dict[str, torch.dtype]:
    """Per key: ``dtype`` (or the first model's dtype) for floating tensors, the first's dtype for the rest."""
    out = {}
    for key, info in first.items():
        if not info.dtype.is_floating_point:
            out[key] = info.dtype
        elif dtype is not None:
            out[key] = dtype
        elif info.dtype in AVERAGE_DTYPES:
            out[key] = info.dtype
        else:
            raise TypeError(f"tensor {key!r} of {label} has dtype {info.dtype}, which cannot hold a merge; "
                            "choose an output dtype (dtype=, --dtype)")
    return out


def infos_of(label: str, state_dict: Any) -> Dict[str, TensorInfo]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{label} must be a mapping of names to tensors, got {type(state_dict).__name__}")
    infos = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{label}[{key!r}] is a {type(value).__name__}, not a Tensor")
        infos[key] = TensorInfo(tuple(value.shape), value.dtype)
    return infos


def resolve_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
