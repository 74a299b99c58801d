"""Checkpoint readers: safetensors files, torch checkpoints, sharded and Hugging Face folders.

Every reader exposes ``path``, ``files`` (the files it reads), ``infos`` (key -> TensorInfo, read
from headers before any data), ``read(key)``, ``release(key, tensor)`` and ``close()``, so a merge
can validate everything first and then stream tensor by tensor.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import struct
from typing import BinaryIO, Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor

from .common import PathLike, StateDict, TensorInfo, first_line as _first_line, name_list as _name_list

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# safetensors dtype codes (https://github.com/huggingface/safetensors, format description).
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces


class SafetensorsFile:
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
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
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
    """Shards described by an index file (``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``).

    ``weight_map`` (key -> shard file name, in the index's order) and ``index_name`` let a merge
    write its output with the same sharding.
    """

    def __init__(self, folder: str, index_path: str):
        self.path = folder
        self.index_name = os.path.basename(index_path)
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of names to file names")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: not a valid shard index: {_first_line(exc)}") from None
        for name in weight_map.values():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"{index_path}: shard name {name!r} is not a file name in the folder")
        self.weight_map: Dict[str, str] = dict(weight_map)
        self._shards: Dict[str, Union[SafetensorsFile, _TorchCheckpoint]] = {}
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


def _open_folder(folder: str) -> Union[SafetensorsFile, _TorchCheckpoint, _ShardedFolder]:
    """A checkpoint folder, as ``save_pretrained`` writes one, checked in this order:

    ``model.safetensors.index.json`` (shards), ``model.safetensors``, ``pytorch_model.bin.index.json``
    (shards), ``pytorch_model.bin``; failing those, exactly one ``*.index.json``, else exactly one
    ``*.safetensors`` file.
    """
    names = set(os.listdir(folder))
    if SAFETENSORS_INDEX in names:
        return _ShardedFolder(folder, os.path.join(folder, SAFETENSORS_INDEX))
    if SAFETENSORS_SINGLE in names:
        return _open_file(os.path.join(folder, SAFETENSORS_SINGLE))
    if TORCH_INDEX in names:
        return _ShardedFolder(folder, os.path.join(folder, TORCH_INDEX))
    if TORCH_SINGLE in names:
        return _open_file(os.path.join(folder, TORCH_SINGLE))
    indexes = sorted(n for n in names if n.endswith(".index.json"))
    if len(indexes) == 1:
        return _ShardedFolder(folder, os.path.join(folder, indexes[0]))
    singles = sorted(n for n in names if n.endswith(".safetensors"))
    if not indexes and len(singles) == 1:
        return _open_file(os.path.join(folder, singles[0]))
    found = ", ".join(sorted(indexes + singles)) or "none of them"
    raise ValueError(f"{folder}: a checkpoint folder needs {SAFETENSORS_INDEX} (shards), {SAFETENSORS_SINGLE}, "
                     f"{TORCH_INDEX} or {TORCH_SINGLE}; found {found}")


def _open_file(path: str) -> Union[SafetensorsFile, _TorchCheckpoint]:
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(TORCH_SUFFIXES):
        return _TorchCheckpoint(path)
    raise ValueError(f"{path}: unknown checkpoint type; expected .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or a sharded folder")


def _open_checkpoint(path: PathLike) -> Union[SafetensorsFile, _TorchCheckpoint, _ShardedFolder]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        return _open_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (models are read from local files only)")
    return _open_file(path)


def load_state_dict(path: PathLike) -> StateDict:
    """Load a whole checkpoint into a state dict on the CPU.

    ``path`` is a ``.safetensors`` file, a torch checkpoint (``.pt``/``.pth``/``.bin``/``.ckpt``,
    loaded with ``torch.load(mmap=True, weights_only=True)``, whose tensors are views of the
    mapped file), or a folder as ``save_pretrained`` writes it (``model.safetensors``, or shards with
    ``model.safetensors.index.json``; see :func:`_open_folder`). Raises
    ``FileNotFoundError`` or ``ValueError`` naming the path when it is missing or not a valid
    checkpoint holding a flat mapping of names to tensors.
    """
    reader = _open_checkpoint(path)
    try:
        return {key: reader.read(key) for key in reader.infos}
    finally:
        reader.close()
