"""Streamed merges of checkpoint files: validate everything, then read, merge and write tensor by tensor.

Peak memory is about (K+1) times the largest tensor (one tensor of every input, plus the output
being written), plus a fixed number of float32 temporaries of that tensor's size that depends
on the method, not on K (docs/merge_methods.md lists them).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import __version__
from .common import (DTypeLike, MergeParameterError, PathLike, as_numbers, check_same_layout, normalized,
                     output_dtypes, parse_dtype, resolve_device)
from .methods import Filtered, Gradient, Plan, TensorParams, layer_positions, make_plan, merge_tensor
from .readers import _open_checkpoint, _ShardedFolder
from . import writer
from .state_dicts import _split_parameters


def merge_files(paths: Sequence[PathLike], out_path: PathLike,
                weights: Optional[Union[Sequence[float], Tensor]] = None, *, dtype: DTypeLike = None,
                device: Union[str, torch.device] = "cpu", normalize: Optional[bool] = None, method: str = "linear",
                base: Optional[PathLike] = None, progress: Optional[bool] = None, seed: Optional[int] = None,
                metadata: Optional[Mapping[str, str]] = None, **params: Any) -> None:
    """Merge K checkpoints into one safetensors file or folder, streaming tensor by tensor.

    Args:
        paths: K checkpoints: ``.safetensors`` files, torch checkpoints (``.pt``/``.pth``/
            ``.bin``/``.ckpt``, memory-mapped) or folders as ``save_pretrained`` writes them
            (``model.safetensors``, or shards with ``model.safetensors.index.json``); formats may
            be mixed.
        out_path: a ``.safetensors`` file (replaced if it exists), or a folder (any other name;
            it must not exist or be empty). A folder output takes the reference input's layout:
            the same shards and index when the reference (the base, else the first model) is
            sharded, else one ``model.safetensors``.
        weights: one weight per path. ``linear``: uniform when None, scaled to sum 1 unless
            ``normalize=False``. ``task_arithmetic``: the lambdas, required, used as given.
            Other methods: 1 each by default.
        dtype: dtype of merged floating tensors (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"`` or
            a torch dtype); by default the reference input's.
        device: where the arithmetic runs (``"cpu"`` or ``"cuda"``); files are read and
            written through the CPU.
        normalize: the method's normalize flag (None: the method's default).
        method: one of :data:`swm_fused.merge.METHODS`.
        base: the base checkpoint, for the methods that use one.
        progress: show a tqdm bar on stderr; None shows it only when stderr is a terminal.
        seed: the seed of DARE's and DELLA's draws; random when None (and recorded).
        metadata: more string metadata to record beside the merge's own (below), e.g. what the
            weights were computed from (``swm-fused phema`` records the post-hoc EMA's target and
            coefficients); a key the merge writes itself is refused (ValueError) before anything is written.
        params: the method's other parameters (``density``, ``gamma``, ``epsilon``, ``lambda_``,
            ``majority_sign``, ``rescale``, ``filter_wise``, ``t``), as in
            :func:`swm_fused.merge.merge_models`.

    Safety: everything is validated first (method and parameters, files exist and parse, same
    keys, shapes and floating-ness, the output is none of the inputs); nothing is written before.
    The output is written under a temporary name beside ``out_path`` and renamed into place
    only when complete; on any error or interrupt the temporary output is removed.

    Metadata (strings, ``safetensors.safe_open(...).metadata()``; a folder's index holds them
    too): ``format`` (``"pt"``), ``swm_fused.version``, ``swm_fused.method``, ``swm_fused.inputs``
    (JSON list of the paths as given), ``swm_fused.weights`` (the weights applied, after
    normalization, when they are the same for every tensor), ``swm_fused.base``,
    ``swm_fused.base_weight`` (task arithmetic: ``1 - sum`` of the applied weights),
    ``swm_fused.seed`` (random methods) and ``swm_fused.config`` (the merge as a mergekit-style
    config, JSON; the config file's own text for :func:`merge_config`), and the keys of ``metadata``.
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence) or len(paths) == 0:
        raise TypeError("paths must be a non-empty list of checkpoint paths")
    if normalize is not None:
        params["normalize"] = normalize
    general, per_model = _split_parameters(params, len(paths))
    plan = make_plan(method, len(paths), base is not None,
                     weights=None if weights is None else as_numbers("weights", weights),
                     general=general, per_model=per_model, seed=seed)
    stream_merge(plan, base, list(paths), out_path, dtype=dtype, device=device, progress=progress,
                 metadata=metadata)


def _check_metadata(metadata: Any) -> Dict[str, str]:
    """Extra metadata: a mapping of str to str (safetensors metadata holds strings only)."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    return dict(metadata)


def _jsonable(setting: Any) -> Any:
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, Filtered):
        return [dict({"filter": f} if f is not None else {}, value=_jsonable(v)) for f, v in setting.entries]
    return setting


def effective_config(plan: Plan, base: Optional[PathLike], paths: Sequence[PathLike],
                     out_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """The merge as a mergekit-style config (what ``--config`` would read to redo it)."""
    config: Dict[str, Any] = {"merge_method": plan.spec.name}
    if base is not None:
        config["base_model"] = os.fspath(base)
    models = []
    for i, path in enumerate(paths):
        entry: Dict[str, Any] = {"model": os.fspath(path)}
        if plan.per_model[i]:
            entry["parameters"] = {k: _jsonable(v) for k, v in plan.per_model[i].items()}
        models.append(entry)
    config["models"] = models
    parameters = {k: _jsonable(v) for k, v in plan.general.items()}
    if plan.seed is not None:
        parameters["seed"] = plan.seed
    if parameters:
        config["parameters"] = parameters
    if out_dtype is not None:
        config["out_dtype"] = str(out_dtype).replace("torch.", "")
    return config


def _constant_weights(plan: Plan, params: Mapping[str, TensorParams]) -> Optional[Tuple[List[float], Optional[float]]]:
    """(weights applied to the models, base weight or None), when they are the same for every tensor."""
    if not params or "weight" not in plan.spec.parameters:
        return None
    applied = set()
    for p in params.values():
        weights = [m["weight"] for m in p.models]
        if plan.spec.name == "linear":
            weights = normalized(weights) if p.general["normalize"] else weights
            applied.add((tuple(weights), None))
        elif plan.spec.name == "task_arithmetic":
            divisor = math.fsum(weights) if p.general["normalize"] else 1.0
            coefficients = [p.general["lambda"] * w / divisor for w in weights]
            applied.add((tuple(coefficients), 1.0 - math.fsum(coefficients)))
        else:
            applied.add((tuple(weights), None))
    if len(applied) != 1:
        return None
    weights, base_weight = applied.pop()
    return list(weights), base_weight


def stream_merge(plan: Plan, base: Optional[PathLike], paths: Sequence[PathLike], out_path: PathLike, *,
                 dtype: DTypeLike = None, device: Union[str, torch.device] = "cpu", progress: Optional[bool] = None,
                 config_text: Optional[str] = None, layer_ranges: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """Validate the inputs and the output against a validated ``plan``, then merge them to disk, streamed.
    ``metadata`` is recorded beside the merge's own keys, none of which it may name."""
    extra = {} if metadata is None else _check_metadata(metadata)
    out_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    all_paths = ([base] if base is not None else []) + list(paths)

    with contextlib.ExitStack() as stack:
        readers = []
        for path in all_paths:
            reader = _open_checkpoint(path)
            stack.callback(reader.close)
            readers.append(reader)
        out, folder = writer.check_output_path(out_path, [f for r in readers for f in r.files])
        labels = [reader.path for reader in readers]
        check_same_layout(labels, [r.infos for r in readers])
        reference = readers[0]
        out_dtypes = output_dtypes(reference.infos, out_dtype, labels[0])
        keys = list(reference.infos)
        positions = layer_positions(keys)
        if layer_ranges is not None:
            _check_layer_ranges(layer_ranges, positions, keys, labels)
        params = {key: plan.params_for(key, positions[key]) for key in keys if reference.infos[key].dtype.is_floating_point}

        weight_map = reference.weight_map if folder and isinstance(reference, _ShardedFolder) else None
        shards = writer.plan_shards(keys, out_dtypes, {k: reference.infos[k].shape for k in keys}, weight_map)
        metadata = {"format": "pt", "swm_fused.version": __version__, "swm_fused.method": plan.spec.name,
                    "swm_fused.inputs": json.dumps([os.fspath(p) for p in paths])}
        constant = _constant_weights(plan, params)
        if constant is not None:
            metadata["swm_fused.weights"] = json.dumps(constant[0])
        if base is not None:
            metadata["swm_fused.base"] = os.fspath(base)
            if constant is not None and constant[1] is not None:
                metadata["swm_fused.base_weight"] = json.dumps(constant[1])
        if plan.seed is not None:
            metadata["swm_fused.seed"] = str(plan.seed)
        metadata["swm_fused.config"] = config_text if config_text is not None else \
            json.dumps(effective_config(plan, base, paths, out_dtype))
        clash = sorted(set(extra) & set(metadata))
        if clash:
            raise ValueError(f"metadata: {clash} are the merge's own keys; choose other names")
        metadata.update(extra)

        from tqdm import tqdm
        total = sum(shard.nbytes for shard in shards)
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                                       desc=f"merging {len(readers)} checkpoints",
                                       disable=None if progress is None else not progress))
        has_base = base is not None

        def write_shard(file, shard: writer.Shard) -> None:
            file.write(writer.safetensors_header(shard.layout, metadata))
            for key, dt, _ in shard.layout:
                inputs = [reader.read(key) for reader in readers]
                if dt.is_floating_point:
                    on_device = [t.to(target) for t in inputs]
                    with torch.no_grad():
                        merged = merge_tensor(plan, key, params[key], on_device[0] if has_base else None,
                                              on_device[1:] if has_base else on_device, dt)
                    del on_device
                else:
                    merged = inputs[0]
                writer.write_tensor(file, merged)
                bar.update(merged.numel() * dt.itemsize)
                for reader, tensor in zip(readers, inputs):
                    reader.release(key, tensor)
                del inputs, merged

        if not folder:
            with writer.atomic_output(out) as file:
                for shard in shards:  # one shard: the whole model
                    write_shard(file, shard)
            return
        with writer._atomic_folder(out) as tmp:
            for shard in shards:
                with open(tmp / shard.name, "xb") as file:
                    write_shard(file, shard)
            if weight_map is not None:
                (tmp / writer.SAFETENSORS_INDEX).write_text(writer.index_json(shards, metadata), encoding="utf-8")


def _check_layer_ranges(layer_ranges: Sequence[Optional[Tuple[int, int]]], positions: Mapping[str, float],
                        keys: Sequence[str], labels: Sequence[str]) -> None:
    """A config's ``slices`` are supported when they take every layer of every model: check that."""
    from .methods import _LAYER_INDEX
    indexes = [int(m.group(1)) for m in (_LAYER_INDEX.search(k) for k in keys) if m]
    count = 1 + max(indexes, default=-1)
    for label, layer_range in zip(labels, layer_ranges):
        if layer_range is None:
            continue
        if count == 0:
            raise MergeParameterError(f"slices: {label} has no numbered layers to take layer_range "
                                      f"{list(layer_range)} of; use models: instead of slices:")
        if tuple(layer_range) != (0, count):
            raise MergeParameterError(f"slices: only a slice that takes every layer is supported: {label} has "
                                      f"{count} layers, so its layer_range must be [0, {count}], got "
                                      f"{list(layer_range)}")
