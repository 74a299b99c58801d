"""Model merging: every method in memory and streamed from checkpoint files, driven by code, flags or configs.

Methods (:data:`METHODS`; formulas and sources in docs/merge_methods.md): ``linear``,
``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``,
``della``, ``della_linear``, ``model_stock`` and ``slerp``, plus model soups.

In memory:

- :func:`merge_state_dicts` -- ``sum_k w_k * theta_k`` over state dicts (uniform by default);
- :func:`task_arithmetic` -- ``base + sum_k lambda_k (theta_k - base)`` (Ilharco et al. 2023);
- :func:`uniform_soup` and :func:`greedy_soup` -- model soups (Wortsman et al. 2022);
- :func:`merge_models` -- any method by name; :func:`ties`, :func:`dare_linear`, :func:`dare_ties`,
  :func:`breadcrumbs`, :func:`breadcrumbs_ties`, :func:`della`, :func:`della_linear`,
  :func:`model_stock` and :func:`slerp` -- one per method;
- :func:`load_state_dict` -- read a safetensors file, a torch checkpoint or a checkpoint folder.

On disk, :func:`merge_files` merges checkpoint files tensor by tensor, so its peak memory is
about (K+1) times the largest tensor plus a few float32 temporaries of that size, rather than
the size of a model, and writes the result atomically as safetensors (one file, or a folder
keeping the input's shards) with the merge in its metadata. :func:`merge_config` runs a
mergekit-style YAML config. ``swm-fused merge`` is their command line.

Every reduction and accumulation runs in float32 (float64 for float64 inputs or outputs), on
the tensors' device, rounding once at the store.

Modules: :mod:`.methods` (the methods, their parameters and per-tensor math), :mod:`.kernels`
(the element-wise steps fused kernels will replace), :mod:`.state_dicts` (in-memory merges),
:mod:`.readers` (checkpoint readers), :mod:`.writer` (the streamed safetensors writer),
:mod:`.files` (streamed merges), :mod:`.config` (YAML configs), :mod:`.common` (shared checks).
"""
from __future__ import annotations

from . import common, config, files, kernels, methods, readers, state_dicts, writer  # noqa: F401
from .common import (DTYPE_NAMES, SHORT_DTYPE_NAMES, DTypeLike, MergeConfigError, MergeParameterError, PathLike,
                     StateDict, TensorInfo)
from .config import MergeConfig, load_config, merge_config
from .files import merge_files
from .kernels import MAJORITY_SIGNS, RESCALES
from .methods import METHOD_ALIASES, METHOD_SPECS, METHODS, layer_positions
from .readers import SAFETENSORS_INDEX, TORCH_SUFFIXES, load_state_dict
from .state_dicts import (breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, greedy_soup,
                          merge_models, merge_state_dicts, model_stock, slerp, task_arithmetic, ties, uniform_soup)
from .writer import _write_tensor  # noqa: F401  (kept importable; patch writer._write_tensor to intercept writes)

__all__ = [
    "METHODS", "METHOD_SPECS", "METHOD_ALIASES", "DTYPE_NAMES", "SHORT_DTYPE_NAMES", "MAJORITY_SIGNS", "RESCALES",
    "MergeParameterError", "MergeConfigError", "MergeConfig", "TensorInfo", "StateDict", "PathLike", "DTypeLike",
    "SAFETENSORS_INDEX", "TORCH_SUFFIXES",
    "merge_state_dicts", "task_arithmetic", "uniform_soup", "greedy_soup", "merge_models", "ties", "dare_linear",
    "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp",
    "load_state_dict", "merge_files", "load_config", "merge_config", "layer_positions",
]
