"""mergekit-style YAML merge configs: parse, check, and run them through the streamed merge.

The layout (mergekit's)::

    merge_method: ties
    base_model: path/to/base            # a local file or folder
    models:
      - model: path/to/math
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/code
        parameters: {weight: 0.5, density: [0.3, 0.7]}   # a gradient over the layers
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}
    dtype: bfloat16

``slices:`` is read only in the form that takes every layer of every model (one slice whose
sources' ``layer_range`` is ``[0, number of layers]``), which many slerp configs use; any other
slicing is a clear error, as are tokenizer options (``tokenizer_source``, ``tokenizer``,
``chat_template``) and ``modules``, which swm_fused does not implement.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .common import MergeConfigError, MergeParameterError, PathLike, parse_dtype
from .files import stream_merge
from .methods import Plan, canonical_method, make_plan

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype")
UNSUPPORTED_KEYS = {
    "tokenizer_source": "swm-fused merges weights only and builds no tokenizer; remove tokenizer_source and copy "
                        "the tokenizer files you want next to the output",
    "tokenizer": "swm-fused merges weights only and builds no tokenizer; remove the tokenizer section",
    "chat_template": "swm-fused merges weights only and writes no chat template; remove chat_template",
    "modules": "multi-module configs (modules:) are not supported; use models:",
}


@dataclass
class MergeConfig:
    """A parsed config: what :func:`merge_config` runs."""

    method: str
    base: Optional[str]
    models: List[str]
    per_model: List[Dict[str, Any]]
    parameters: Dict[str, Any]
    out_dtype: Optional[torch.dtype]
    text: str
    layer_ranges: Optional[List[Optional[Tuple[int, int]]]] = None  # from slices:, base first when it has one
    source: str = "<config>"
    plan: Optional[Plan] = field(default=None, repr=False)


def _error(source: str, message: str) -> MergeConfigError:
    return MergeConfigError(f"{source}: {message}")


def load_config(config: Union[PathLike, Mapping[str, Any]], *, text: Optional[str] = None,
                seed: Optional[int] = None) -> MergeConfig:
    """Read and check a merge config: a YAML file's path, or an already parsed mapping.

    Raises :class:`~swm_fused.merge.MergeConfigError` (a ValueError) for YAML that does not
    parse, an unknown or unsupported key, an unknown method or parameter, or a bad value, and
    OSError when the file cannot be read. Model paths are read as given, relative ones from
    the current directory (as mergekit does).
    """
    import yaml

    if isinstance(config, Mapping):
        source, data = "config", dict(config)
        text = text if text is not None else yaml.safe_dump(dict(config), sort_keys=False)
    else:
        source = os.fspath(config)
        with open(source, encoding="utf-8") as f:
            text = f.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise _error(source, f"not valid YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        raise _error(source, f"a merge config is a YAML mapping with merge_method and models, got "
                             f"{type(data).__name__}")
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise _error(source, f"{key}: {UNSUPPORTED_KEYS[key]}")
        if key not in TOP_LEVEL_KEYS:
            raise _error(source, f"unknown key {key!r}; a config takes {', '.join(TOP_LEVEL_KEYS)}")
    if "merge_method" not in data:
        raise _error(source, "merge_method is missing")
    try:
        spec = canonical_method(data["merge_method"])
    except MergeParameterError as exc:
        raise _error(source, str(exc)) from None
    base = _model_path(source, data.get("base_model"), "base_model") if data.get("base_model") is not None else None
    parameters = _mapping(source, data.get("parameters"), "parameters")

    layer_ranges: Optional[List[Optional[Tuple[int, int]]]] = None
    if ("models" in data) == ("slices" in data):
        raise _error(source, "give exactly one of models: and slices:")
    if "models" in data:
        entries = data["models"]
        if not isinstance(entries, list) or not entries:
            raise _error(source, "models must be a non-empty list of {model: PATH, parameters: {...}}")
        models, per_model = [], []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise _error(source, f"models[{i}] must be {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            models.append(_model_path(source, entry["model"], f"models[{i}].model"))
            per_model.append(_mapping(source, entry.get("parameters"), f"models[{i}].parameters"))
    else:
        models, per_model, ranges, slice_parameters = _read_slices(source, data["slices"])
        parameters = dict(parameters, **slice_parameters)
        layer_ranges = list(ranges)

    # The base may also be listed among the models (mergekit's configs often do): it is the base.
    if base is not None:
        same = [i for i, m in enumerate(models) if _same_model(m, base)]
        if spec.name == "linear":
            if same:
                base = None  # linear has no base: the listed model is one of the models
        else:
            for i in reversed(same):
                del models[i], per_model[i]
                if layer_ranges is not None:
                    base_range = layer_ranges.pop(i)
            if layer_ranges is not None:
                layer_ranges.insert(0, base_range if same else None)
    working = _dtype(source, data, "dtype")  # mergekit's working dtype: here, the output's unless out_dtype
    out_dtype = _dtype(source, data, "out_dtype") or working
    try:
        plan = make_plan(spec.name, len(models), base is not None, general=parameters, per_model=per_model,
                         seed=seed)
    except MergeParameterError as exc:
        raise _error(source, str(exc)) from None
    return MergeConfig(spec.name, base, models, per_model, parameters, out_dtype, text, layer_ranges, source, plan)


def merge_config(config: Union[PathLike, Mapping[str, Any], MergeConfig], out_path: PathLike, *,
                 device: Union[str, torch.device] = "cpu", progress: Optional[bool] = None,
                 seed: Optional[int] = None) -> None:
    """Run a mergekit-style config (a YAML file's path, a parsed mapping or a :class:`MergeConfig`).

    Streams like :func:`~swm_fused.merge.merge_files` and writes ``out_path`` (a ``.safetensors``
    file or a folder) only after everything checks out; the output's metadata records the
    config's text (``swm_fused.config``) and the seed of any random draws (``swm_fused.seed``).
    ``seed`` sets that seed when the config has none (``parameters: {seed: N}``).
    """
    if not isinstance(config, MergeConfig):
        config = load_config(config, seed=seed)
    elif seed is not None:
        raise MergeParameterError("give the seed to load_config, or in the config")
    assert config.plan is not None
    stream_merge(config.plan, config.base, config.models, out_path, dtype=config.out_dtype, device=device,
                 progress=progress, config_text=config.text, layer_ranges=config.layer_ranges)


def _dtype(source: str, data: Mapping[str, Any], key: str) -> Optional[torch.dtype]:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _error(source, f"{key} must be a dtype name such as bfloat16, got {value!r}")
    try:
        return parse_dtype(value)
    except ValueError as exc:
        raise _error(source, f"{key}: {exc}") from None


def _same_model(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _model_path(source: str, value: Any, what: str) -> str:
    if isinstance(value, Mapping):
        raise _error(source, f"{what}: only local paths are supported, not {dict(value)!r} (LoRA and other model "
                             "references are mergekit features swm-fused does not implement)")
    if not isinstance(value, str) or not value.strip():
        raise _error(source, f"{what} must be the path of a local checkpoint file or folder, got {value!r}")
    return value


def _mapping(source: str, value: Any, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(source, f"{what} must be a mapping of parameter names to values, got {value!r}")
    return dict(value)


def _read_slices(source: str, slices: Any):
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        raise _error(source, "slices: only one slice that takes every layer of every model is supported "
                             "(layer stacking and partial ranges are not); use models: for a plain merge")
    (only,) = slices
    unknown = set(only) - {"sources", "parameters"}
    if unknown:
        raise _error(source, f"slices[0]: {', '.join(sorted(unknown))} not supported (a slice takes sources and "
                             "parameters here)")
    sources = only.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _error(source, "slices[0].sources must be a non-empty list of {model, layer_range}")
    models, per_model, ranges = [], [], []
    for i, entry in enumerate(sources):
        if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "layer_range",
                                                                                     "parameters"}:
            raise _error(source, f"slices[0].sources[{i}] must be {{model, layer_range, parameters}}, got {entry!r}")
        layer_range = entry.get("layer_range")
        if not (isinstance(layer_range, list) and len(layer_range) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)):
            raise _error(source, f"slices[0].sources[{i}].layer_range must be [first, end], got {layer_range!r}")
        models.append(_model_path(source, entry["model"], f"slices[0].sources[{i}].model"))
        per_model.append(_mapping(source, entry.get("parameters"), f"slices[0].sources[{i}].parameters"))
        ranges.append((layer_range[0], layer_range[1]))
    return models, per_model, ranges, _mapping(source, only.get("parameters"), "slices[0].parameters")
