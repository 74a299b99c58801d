"""K-way merges of state dicts and checkpoint files: weighted averages, task arithmetic, model soups.

In memory:

- :func:`merge_state_dicts` -- ``sum_k w_k * theta_k`` over state dicts (uniform by default);
- :func:`task_arithmetic` -- ``base + sum_k lambda_k (theta_k - base)`` (Ilharco et al. 2023);
- :func:`uniform_soup` and :func:`greedy_soup` -- model soups (Wortsman et al. 2022);
- :func:`load_state_dict` -- read a safetensors file, a torch checkpoint or a sharded folder.

On disk, :func:`merge_files` merges checkpoint files tensor by tensor, so its peak memory is
about (K+1) times the largest tensor rather than the size of a model, and writes the result
atomically as safetensors with the inputs and weights in its metadata. ``swm-fused merge`` is
its command line.

Every merge runs through :func:`swm_fused.merge_`: one fused pass per tensor that accumulates
in float32 (float64 for float64 outputs) and rounds once, at the store.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import mmap
import numbers
import os
import secrets
import struct
import sys
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import torch
from torch import Tensor

from . import __version__
from .ops import AVERAGE_DTYPES, merge_

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, Tensor]
DTypeLike = Union[torch.dtype, str, None]

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
METHODS = ("linear", "task-arithmetic")

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
}

# safetensors dtype codes (https://github.com/huggingface/safetensors, format description).
_SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces


class TensorInfo(NamedTuple):
    """What validation needs to know about a tensor before reading its data."""
    shape: Tuple[int, ...]
    dtype: torch.dtype


# --------------------------------------------------------------------------- validation helpers

def _parse_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """None, a torch float dtype, or one of the names fp32/bf16/fp16/fp64 (and their long forms)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16, fp64")
        return _DTYPE_NAMES[dtype.lower()]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name such as 'bf16', got {type(dtype).__name__}")
    if dtype not in AVERAGE_DTYPES:
        raise TypeError(f"dtype {dtype} cannot hold a merge; use float32, float64, bfloat16 or float16")
    return dtype


def _as_numbers(what: str, values: Union[Sequence[float], Tensor]) -> List[float]:
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


def _resolve_weights(weights: Optional[Union[Sequence[float], Tensor]], count: int, normalize: bool) -> List[float]:
    """Uniform weights when None; otherwise check the count and, with ``normalize``, scale to sum 1."""
    if weights is None:
        return [1.0 / count] * count
    resolved = _as_numbers("weights", weights)
    if len(resolved) != count:
        raise ValueError(f"got {len(resolved)} weights for {count} models; give one weight per model")
    if normalize:
        total = math.fsum(resolved)
        if abs(total) <= 1e-12 * math.fsum(abs(w) for w in resolved):
            raise ValueError(f"weights {resolved} sum to 0 and cannot be normalized; "
                             "pass normalize=False (--no-normalize) to use them as given")
        resolved = [w / total for w in resolved]
    return resolved


def _name_list(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_same_layout(labels: Sequence[str], infos: Sequence[Mapping[str, TensorInfo]]) -> None:
    """Raise one ValueError naming the first model whose keys, shapes or kinds differ from model 0."""
    reference = infos[0]
    for label, info in zip(labels[1:], infos[1:]):
        if info.keys() != reference.keys():
            missing = [k for k in reference if k not in info]
            extra = [k for k in info if k not in reference]
            parts = ([f"lacks {_name_list(missing)}"] if missing else []) + \
                    ([f"has extra {_name_list(extra)}"] if extra else [])
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


def _output_dtypes(first: Mapping[str, TensorInfo], dtype: Optional[torch.dtype], label: str) -> Dict[str, torch.dtype]:
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


def _infos_of(label: str, state_dict: Any) -> Dict[str, TensorInfo]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{label} must be a mapping of names to tensors, got {type(state_dict).__name__}")
    infos = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{label}[{key!r}] is a {type(value).__name__}, not a Tensor")
        infos[key] = TensorInfo(tuple(value.shape), value.dtype)
    return infos


# --------------------------------------------------------------------------- in-memory merges

def _merge_in_memory(state_dicts: Sequence[Mapping[str, Tensor]], labels: Sequence[str], weights: List[float],
                     dtype: Optional[torch.dtype]) -> StateDict:
    infos = [_infos_of(label, sd) for label, sd in zip(labels, state_dicts)]
    _check_same_layout(labels, infos)
    out_dtypes = _output_dtypes(infos[0], dtype, labels[0])
    first = state_dicts[0]
    merged: StateDict = {}
    by_device: Dict[torch.device, Tuple[List[Tensor], List[List[Tensor]]]] = {}
    for key, template in first.items():
        if not template.is_floating_point():
            merged[key] = template.detach().clone()
            continue
        out = torch.empty(template.shape, dtype=out_dtypes[key], device=template.device)
        merged[key] = out
        outs, inputs = by_device.setdefault(template.device, ([], [[] for _ in state_dicts]))
        outs.append(out)
        for k, sd in enumerate(state_dicts):
            inputs[k].append(sd[key].detach().to(template.device))
    for outs, inputs in by_device.values():  # one fused merge_ per device over every tensor
        merge_(outs, inputs, weights)
    return merged


def merge_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]],
                      weights: Optional[Union[Sequence[float], Tensor]] = None, *,
                      normalize: bool = True, dtype: DTypeLike = None) -> StateDict:
    """Weighted K-way merge of state dicts: ``out[key] = sum_k w_k * state_dicts[k][key]``.

    Args:
        state_dicts: K mappings from names to tensors, with the same keys and shapes.
        weights: one number per state dict (negative values allowed); uniform when None.
        normalize: scale the weights to sum to 1 (raises if they sum to 0).
        dtype: dtype of the merged floating tensors (float32, bfloat16, float16, float64 or a
            name such as ``"bf16"``); by default each tensor keeps the first state dict's dtype.

    Returns:
        A new state dict in the first state dict's key order, each tensor on the first state
        dict's device. Floating tensors are merged in one fused pass per device that accumulates
        in float32 (float64 for float64 outputs); inputs may mix floating dtypes. **Non-floating
        entries (integer or bool buffers such as ``num_batches_tracked``) are copied from the
        first state dict**, not merged.

    Raises:
        ValueError: key sets, shapes or floating-ness differ (one error naming the first
            offending keys or shapes), the weight count is wrong, or weights sum to 0 with
            ``normalize``. TypeError: a value is not a tensor, or a dtype cannot hold a merge.
    """
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or len(state_dicts) == 0:
        raise TypeError("state_dicts must be a non-empty list of state dicts")
    resolved = _resolve_weights(weights, len(state_dicts), normalize)
    labels = [f"state_dicts[{k}]" for k in range(len(state_dicts))]
    return _merge_in_memory(state_dicts, labels, resolved, _parse_dtype(dtype))


def _task_weights(lambdas: Union[float, Sequence[float], Tensor], count: int) -> List[float]:
    """[1 - sum(lambdas), *lambdas]: the base's weight, then one per fine-tuned model."""
    if isinstance(lambdas, numbers.Real) and not isinstance(lambdas, bool):
        lambdas = [float(lambdas)] * count
    resolved = _as_numbers("lambdas", lambdas)
    if len(resolved) != count:
        raise ValueError(f"got {len(resolved)} lambdas for {count} fine-tuned models; give one per model")
    return [1.0 - math.fsum(resolved), *resolved]


def task_arithmetic(base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]],
                    lambdas: Union[float, Sequence[float], Tensor], *, dtype: DTypeLike = None) -> StateDict:
    """Task arithmetic (Ilharco et al. 2023): ``base + sum_k lambdas[k] * (finetuned[k] - base)``.

    Computed as one (K+1)-way :func:`swm_fused.merge_` with weights
    ``[1 - sum(lambdas), *lambdas]``, so no task vector is ever materialised. ``lambdas`` is one
    number per fine-tuned model, or a single number shared by all; they are used as given, never
    normalized (a negative lambda subtracts a task). Output dtypes and non-floating entries
    follow the base, as in :func:`merge_state_dicts`.
    """
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or len(finetuned) == 0:
        raise TypeError("finetuned must be a non-empty list of state dicts")
    labels = ["base", *(f"finetuned[{k}]" for k in range(len(finetuned)))]
    return _merge_in_memory([base, *finetuned], labels, _task_weights(lambdas, len(finetuned)), _parse_dtype(dtype))


def uniform_soup(state_dicts: Sequence[Mapping[str, Tensor]], dtype: DTypeLike = None) -> StateDict:
    """Uniform model soup (Wortsman et al. 2022): the plain average of ``state_dicts``."""
    return merge_state_dicts(state_dicts, None, dtype=dtype)


def _score(eval_fn: Callable[[StateDict], float], state_dict: Mapping[str, Tensor], what: str) -> float:
    score = eval_fn(state_dict)
    if isinstance(score, Tensor) and score.numel() == 1:
        score = score.item()
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or math.isnan(float(score)):
        raise ValueError(f"eval_fn must return a real, non-NaN score (higher is better); got {score!r} for {what}")
    return float(score)


def greedy_soup(state_dicts: Sequence[Mapping[str, Tensor]], eval_fn: Callable[[StateDict], float], *,
                dtype: DTypeLike = None) -> Tuple[StateDict, List[int]]:
    """Greedy model soup (Wortsman et al. 2022, Recipe 1).

    Scores every model alone with ``eval_fn`` (a held-out score, higher is better), visits
    them from best to worst (ties keep list order), and adds each one to the soup only if
    the uniform average of the soup plus that model scores at least as well as the soup did.

    Returns:
        ``(soup, chosen)``: the uniform average of the chosen models (a new state dict; its
        non-floating entries and default dtypes come from the best model) and their indices
        into ``state_dicts`` in the order they were added, best model first.
    """
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or len(state_dicts) == 0:
        raise TypeError("state_dicts must be a non-empty list of state dicts")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    scores = [_score(eval_fn, sd, f"state_dicts[{k}]") for k, sd in enumerate(state_dicts)]
    order = sorted(range(len(state_dicts)), key=lambda k: -scores[k])
    chosen = [order[0]]
    soup = uniform_soup([state_dicts[order[0]]], dtype=dtype)
    best = scores[order[0]]
    for k in order[1:]:
        candidate = uniform_soup([state_dicts[i] for i in chosen + [k]], dtype=dtype)
        score = _score(eval_fn, candidate, f"the soup of models {chosen + [k]}")
        if score >= best:
            soup, best = candidate, score
            chosen.append(k)
    return soup, chosen


# --------------------------------------------------------------------------- checkpoint readers

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class _SafetensorsFile:
    """One safetensors file, read one tensor at a time with plain reads into fresh tensors.

    safetensors' own ``safe_open`` maps the file, and the pages it touches stay resident until
    the handle closes; reopening it per tensor re-parses the header every time. Plain reads keep
    the memory of a streamed merge at exactly the tensors being merged.
    """

    def __init__(self, path: str):
        self.path = path
        self.files = [path]
        self._file: BinaryIO = open(path, "rb", buffering=0)
        try:
            self.infos, self._offsets = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _invalid(self, reason: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid safetensors file: {reason}")

    def _parse_header(self):
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._invalid(f"only {size} bytes long")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise self._invalid(f"header length {header_len} does not fit in a file of {size} bytes")
        try:
            header = json.loads(self._file.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._invalid(f"header is not JSON ({_first_line(exc)})") from None
        if not isinstance(header, dict):
            raise self._invalid("header is not a JSON object")
        header.pop("__metadata__", None)
        data_start, data_len = 8 + header_len, size - 8 - header_len
        infos, offsets = {}, {}
        for key, entry in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._invalid(f"bad or unsupported entry for tensor {key!r}: {entry!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or end - begin != nbytes:
                raise self._invalid(f"tensor {key!r} has offsets {[begin, end]} that do not match shape "
                                    f"{list(shape)} and dtype {entry['dtype']} in {data_len} data bytes")
            infos[key] = TensorInfo(shape, dtype)
            offsets[key] = (data_start + begin, nbytes)
        return infos, offsets

    def read(self, key: str) -> Tensor:
        start, nbytes = self._offsets[key]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        self._file.seek(start)
        done = 0
        while done < nbytes:  # one read() returns at most ~2 GiB on Linux
            got = self._file.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path}: file ends inside tensor {key!r}")
            done += got
        info = self.infos[key]
        return buffer.view(info.dtype).reshape(info.shape)

    def release(self, key: str, tensor: Tensor) -> None:
        """Nothing to do: read() returns ordinary tensors, freed when dropped."""

    def close(self) -> None:
        self._file.close()


class _TorchCheckpoint:
    """A torch checkpoint (.pt/.bin) loaded with ``mmap=True`` and ``weights_only=True``.

    Tensors are views of a private file mapping; :meth:`release` drops the pages a merged
    tensor touched (``madvise(MADV_DONTNEED)``, Linux), so resident memory stays bounded while
    streaming. Dropped pages of a private file mapping are re-read from the file if touched
    again, so tensors sharing storage stay correct.
    """

    def __init__(self, path: str):
        self.path = path
        self.files = [path]
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            raise ValueError(f"{path}: cannot load as a torch checkpoint: {_first_line(exc)}") from None
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                 "save the model's state dict itself (model.state_dict())")
        self.state = dict(state)
        self.infos = {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in self.state.items()}
        self._mappings = _private_file_mappings(path)

    def read(self, key: str) -> Tensor:
        return self.state[key]

    def release(self, key: str, tensor: Tensor) -> None:
        """Drop the resident pages behind a tensor that is no longer needed."""
        nbytes = tensor.untyped_storage().nbytes()
        if nbytes == 0 or not self._mappings:
            return
        start = tensor.untyped_storage().data_ptr()
        for lo, hi in self._mappings:
            if lo <= start and start + nbytes <= hi:
                page = mmap.PAGESIZE
                first = max(lo, start // page * page)
                last = min(hi, -(-(start + nbytes) // page) * page)
                _madvise_dontneed(first, last - first)
                return

    def close(self) -> None:
        self.state.clear()


def _private_file_mappings(path: str) -> List[Tuple[int, int]]:
    """Address ranges of this process's private mappings of ``path`` (empty where /proc is absent)."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[1].endswith("p") and fields[5].rstrip("\n") == real:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc_madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _madvise_dontneed(address: int, length: int) -> None:
    _libc_madvise()(address, length, _MADV_DONTNEED)  # best effort: a failure only costs memory


class _ShardedFolder:
    """A folder of shards described by ``model.safetensors.index.json`` (or one other ``*.index.json``)."""

    def __init__(self, folder: str):
        self.path = folder
        index_path = _find_index(folder)
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of names to file names")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: not a valid shard index: {_first_line(exc)}") from None
        self._shards: Dict[str, Union[_SafetensorsFile, _TorchCheckpoint]] = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                self._shards[shard_name] = _open_file(os.path.join(folder, shard_name))
            self._shard_of = {key: self._shards[name] for key, name in weight_map.items()}
            self.infos = {}
            for key, shard in self._shard_of.items():
                if key not in shard.infos:
                    raise ValueError(f"{index_path} puts tensor {key!r} in {shard.path}, which does not hold it")
                self.infos[key] = shard.infos[key]
            for name, shard in self._shards.items():
                unlisted = [k for k in shard.infos if weight_map.get(k) != name]
                if unlisted:
                    raise ValueError(f"{shard.path} holds tensors that {index_path} does not list: "
                                     f"{_name_list(unlisted)}")
        except BaseException:
            self.close()
            raise
        self.files = [index_path, *(s.path for s in self._shards.values())]

    def read(self, key: str) -> Tensor:
        return self._shard_of[key].read(key)

    def release(self, key: str, tensor: Tensor) -> None:
        self._shard_of[key].release(key, tensor)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def _find_index(folder: str) -> str:
    names = os.listdir(folder)
    if SAFETENSORS_INDEX in names:
        return os.path.join(folder, SAFETENSORS_INDEX)
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if len(indexes) != 1:
        found = f"found {', '.join(indexes)}" if indexes else "found none"
        raise ValueError(f"{folder}: a sharded checkpoint folder needs {SAFETENSORS_INDEX} "
                         f"(or exactly one *.index.json); {found}")
    return os.path.join(folder, indexes[0])


def _open_file(path: str) -> Union[_SafetensorsFile, _TorchCheckpoint]:
    if path.endswith(".safetensors"):
        return _SafetensorsFile(path)
    if path.endswith(TORCH_SUFFIXES):
        return _TorchCheckpoint(path)
    raise ValueError(f"{path}: unknown checkpoint type; expected .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or a sharded folder")


def _open_checkpoint(path: PathLike) -> Union[_SafetensorsFile, _TorchCheckpoint, _ShardedFolder]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        return _ShardedFolder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return _open_file(path)


def load_state_dict(path: PathLike) -> StateDict:
    """Load a whole checkpoint into a state dict on the CPU.

    ``path`` is a ``.safetensors`` file, a torch checkpoint (``.pt``/``.pth``/``.bin``/``.ckpt``,
    loaded with ``torch.load(mmap=True, weights_only=True)``, whose tensors are views of the
    mapped file), or a folder of shards with ``model.safetensors.index.json``. Raises
    ``FileNotFoundError`` or ``ValueError`` naming the path when it is missing or not a valid
    checkpoint holding a flat mapping of names to tensors.
    """
    reader = _open_checkpoint(path)
    try:
        return {key: reader.read(key) for key in reader.infos}
    finally:
        reader.close()


# --------------------------------------------------------------------------- streamed writer

def _write_tensor(file: BinaryIO, tensor: Tensor) -> None:
    """Append a tensor's bytes (little-endian, C order), as safetensors stores them."""
    file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _safetensors_header(layout: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                        metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to a multiple of 8."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@contextlib.contextmanager
def _atomic_output(out_path: Path):
    """Yield a new file next to ``out_path``; move it into place only when the block succeeds.

    On any exception, KeyboardInterrupt or SystemExit the temporary file is deleted and
    ``out_path`` is left as it was.
    """
    tmp = out_path.with_name(f".{out_path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_output_path(out_path: PathLike, inputs: Sequence[Any]) -> Path:
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"out_path must be a str or os.PathLike, got {type(out_path).__name__}")
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file (written streamed, with the merge "
                         "recorded in its metadata)")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give a .safetensors file name")
    if not out.parent.resolve().is_dir():
        raise FileNotFoundError(f"{out.parent}: output folder does not exist")
    resolved = out.resolve()
    for reader in inputs:
        for path in reader.files:
            if Path(path).resolve() == resolved or (out.exists() and os.path.samefile(out, path)):
                raise ValueError(f"{out}: the output would overwrite the input {path}; choose another output path")
    return out


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def merge_files(paths: Sequence[PathLike], out_path: PathLike,
                weights: Optional[Union[Sequence[float], Tensor]] = None, *, dtype: DTypeLike = None,
                device: Union[str, torch.device] = "cpu", normalize: bool = True, method: str = "linear",
                base: Optional[PathLike] = None, progress: Optional[bool] = None) -> None:
    """Merge K checkpoint files into one safetensors file, streaming tensor by tensor.

    Args:
        paths: K checkpoints: ``.safetensors`` files, torch checkpoints (``.pt``/``.pth``/
            ``.bin``/``.ckpt``, memory-mapped) or folders of shards with
            ``model.safetensors.index.json``; formats may be mixed.
        out_path: the output, a ``.safetensors`` file (other formats are rejected: only this
            one can be written streamed and carry the merge in its metadata). An existing file
            there is replaced.
        weights: ``method="linear"``: one weight per path, uniform when None, scaled to sum to 1
            when ``normalize``. ``method="task-arithmetic"``: the lambdas, one per path, required
            and never normalized.
        dtype: dtype of merged floating tensors (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"`` or
            a torch dtype); by default the first input's (the base's, for task arithmetic).
        device: where the arithmetic runs (``"cpu"`` or ``"cuda"``); tensors are read and written
            on the CPU.
        method: ``"linear"`` (``sum_k w_k theta_k``) or ``"task-arithmetic"``
            (``base + sum_k lambda_k (theta_k - base)``, as one (K+1)-way merge).
        base: the base checkpoint, for ``method="task-arithmetic"`` only.
        progress: show a tqdm bar on stderr; None shows it only when stderr is a terminal.

    Memory: each step reads one tensor from every input, merges it and appends it to the
    output, so the peak is about (K+1) times the largest tensor plus a constant. Non-floating
    tensors are copied from the first input (the base, for task arithmetic).

    Safety: everything is validated first (files exist and parse, same keys, shapes and
    floating-ness, the weight count, the output is none of the inputs). The output is written
    to a temporary file in the same folder and renamed over ``out_path`` only when complete; on
    any error or interrupt the temporary file is removed, so ``out_path`` is never partial.

    Metadata (strings, readable with ``safetensors.safe_open(...).metadata()``): ``format``
    (``"pt"``), ``swm_fused.version``, ``swm_fused.method``, ``swm_fused.inputs`` (JSON list of
    the paths as given), ``swm_fused.weights`` (JSON list of the weights applied to them,
    after normalization), and for task arithmetic ``swm_fused.base`` and
    ``swm_fused.base_weight`` (``1 - sum(lambdas)``).
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or len(paths) == 0:
        raise TypeError("paths must be a non-empty list of checkpoint paths")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "task-arithmetic":
        if base is None:
            raise ValueError("method 'task-arithmetic' needs a base checkpoint (base=, --base)")
        if weights is None:
            raise ValueError("method 'task-arithmetic' needs one lambda per input (weights=, --weights)")
        applied = _task_weights(weights, len(paths))
    else:
        if base is not None:
            raise ValueError("base is only used by method 'task-arithmetic'")
        applied = _resolve_weights(weights, len(paths), normalize)
    out_dtype = _parse_dtype(dtype)
    target = _resolve_device(device)
    all_paths = [base, *paths] if method == "task-arithmetic" else list(paths)

    with contextlib.ExitStack() as stack:
        readers = []
        for path in all_paths:
            reader = _open_checkpoint(path)
            stack.callback(reader.close)
            readers.append(reader)
        out = _check_output_path(out_path, readers)
        labels = [reader.path for reader in readers]
        _check_same_layout(labels, [r.infos for r in readers])
        out_dtypes = _output_dtypes(readers[0].infos, out_dtype, labels[0])
        # Widest dtypes first keeps every tensor aligned to its element size, as safetensors does.
        keys = sorted(readers[0].infos, key=lambda key: -out_dtypes[key].itemsize)
        layout = [(key, out_dtypes[key], readers[0].infos[key].shape) for key in keys]

        metadata = {"format": "pt", "swm_fused.version": __version__, "swm_fused.method": method,
                    "swm_fused.inputs": json.dumps([os.fspath(p) for p in paths]),
                    "swm_fused.weights": json.dumps(applied[1:] if method == "task-arithmetic" else applied)}
        if method == "task-arithmetic":
            metadata.update({"swm_fused.base": os.fspath(base), "swm_fused.base_weight": json.dumps(applied[0])})

        from tqdm import tqdm
        total = sum(math.prod(shape) * dt.itemsize for _, dt, shape in layout)
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                                       desc=f"merging {len(readers)} checkpoints",
                                       disable=None if progress is None else not progress))
        with _atomic_output(out) as file:
            file.write(_safetensors_header(layout, metadata))
            for key, dt, _ in layout:
                inputs = [reader.read(key) for reader in readers]
                if dt.is_floating_point:
                    merged = torch.empty(inputs[0].shape, dtype=dt, device=target)
                    merge_(merged, [t.to(target) for t in inputs], applied)
                else:
                    merged = inputs[0]
                _write_tensor(file, merged)
                bar.update(merged.numel() * dt.itemsize)
                for reader, tensor in zip(readers, inputs):
                    reader.release(key, tensor)
                del inputs, merged
