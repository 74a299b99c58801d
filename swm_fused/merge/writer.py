"""The streamed safetensors writer: one file, or a folder of shards with an index, written atomically.

A merge first fixes the output's layout (which keys go to which file, in which order, with which
dtypes), then appends tensor after tensor. Nothing appears at the output path until every byte
is written: a file goes to a temporary name beside it and is renamed into place; a folder is
written as a temporary folder beside it and renamed into place.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .readers import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class Shard(NamedTuple):
    """One output file: its name and its tensors as (key, dtype, shape), in file order."""
    name: str
    layout: List[Tuple[str, torch.dtype, Tuple[int, ...]]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.layout)


def _write_tensor(file: BinaryIO, tensor: Tensor) -> None:
    """Append a tensor's bytes (little-endian, C order), as safetensors stores them."""
    file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def write_tensor(file: BinaryIO, tensor: Tensor) -> None:
    """Append a tensor through :func:`_write_tensor` (looked up at call time, so tests can patch it)."""
    _write_tensor(file, tensor)


def safetensors_header(layout: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                        metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to a multiple of 8."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def plan_shards(keys: Sequence[str], out_dtypes: Mapping[str, torch.dtype], shapes: Mapping[str, Tuple[int, ...]],
                weight_map: Optional[Mapping[str, str]] = None) -> List[Shard]:
    """The output files: one (``model.safetensors``) or, given a shard ``weight_map``, the same shards.

    Shard names keep the input's, with a ``.bin`` (or other torch) suffix replaced by
    ``.safetensors``. Within a file the widest dtypes come first, which keeps every tensor
    aligned to its element size, as safetensors does.
    """
    groups: Dict[str, List[str]] = {}
    for key in keys:
        name = SAFETENSORS_SINGLE if weight_map is None else _safetensors_name(weight_map[key])
        groups.setdefault(name, []).append(key)
    shards = []
    for name, group in groups.items():
        ordered = sorted(group, key=lambda key: -out_dtypes[key].itemsize)
        shards.append(Shard(name, [(key, out_dtypes[key], tuple(shapes[key])) for key in ordered]))
    return shards


def _safetensors_name(name: str) -> str:
    stem, suffix = os.path.splitext(name)
    return name if suffix == ".safetensors" else stem + ".safetensors"


def index_json(shards: Sequence[Shard], metadata: Mapping[str, str]) -> str:
    """``model.safetensors.index.json`` for ``shards``: total_size, the merge metadata and the weight map."""
    weight_map = {key: shard.name for shard in shards for key, _, _ in shard.layout}
    meta: Dict[str, Any] = {"total_size": sum(shard.nbytes for shard in shards)}
    meta.update(metadata)
    return json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_output(out_path: Path) -> Iterator[BinaryIO]:
    """Yield a new file next to ``out_path``; move it into place only when the block succeeds.

    On any exception, KeyboardInterrupt or SystemExit the temporary file is deleted and
    ``out_path`` is left as it was.
    """
    tmp = _tmp_name(out_path)
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


@contextlib.contextmanager
def _atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a new, empty folder next to ``out_dir``; rename it to ``out_dir`` only when the block succeeds.

    ``out_dir`` must not exist or be an empty folder (checked before, by :func:`check_output_path`).
    On any error or interrupt the temporary folder and everything in it are removed.
    """
    tmp = _tmp_name(out_dir)
    tmp.mkdir()
    try:
        yield tmp
        for entry in tmp.iterdir():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked before writing); rmdir fails rather than lose anything
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_path(out_path: Any, input_files: Sequence[str]) -> Tuple[Path, bool]:
    """(path, is_folder): a ``.safetensors`` file, or a folder (any other name) that is new or empty.

    Raises if the output would overwrite or contain one of ``input_files``, or its parent folder
    does not exist.
    """
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"out_path must be a str or os.PathLike, got {type(out_path).__name__}")
    out = Path(out_path)
    folder = out.suffix != ".safetensors"
    if out.suffix in (".pt", ".pth", ".bin", ".ckpt", ".json", ".yml", ".yaml"):
        raise ValueError(f"{out}: the output must be a .safetensors file (written streamed, with the merge "
                         "recorded in its metadata) or a folder")
    if not folder and out.is_dir():
        raise ValueError(f"{out}: is a folder; give a .safetensors file name, or a folder name without "
                         "the .safetensors suffix")
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give a .safetensors file name or a new folder")
    if not out.parent.resolve().is_dir():
        raise FileNotFoundError(f"{out.parent}: output folder does not exist")
    resolved = out.resolve()
    for path in input_files:
        in_resolved = Path(path).resolve()
        same = in_resolved == resolved or (out.exists() and not folder and os.path.samefile(out, path))
        inside = folder and resolved in in_resolved.parents
        if same or inside:
            raise ValueError(f"{out}: the output would overwrite the input {path}; choose another output path")
    if folder and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out}: the output folder exists and is not empty; remove it or choose a new folder")
    return out, folder
