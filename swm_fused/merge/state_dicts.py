"""In-memory merges of state dicts: every method, plus model soups.

- :func:`merge_state_dicts` -- ``sum_k w_k * theta_k`` over state dicts (uniform by default);
- :func:`task_arithmetic` -- ``base + sum_k lambda_k (theta_k - base)`` (Ilharco et al. 2023);
- :func:`uniform_soup` and :func:`greedy_soup` -- model soups (Wortsman et al. 2022);
- :func:`merge_models` -- any method of :data:`METHODS` by name, and one function per method:
  :func:`ties`, :func:`dare_linear`, :func:`dare_ties`, :func:`breadcrumbs`, :func:`breadcrumbs_ties`,
  :func:`della`, :func:`della_linear`, :func:`model_stock`, :func:`slerp`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..ops import merge_
from .common import (DTypeLike, MergeParameterError, StateDict, as_numbers, check_same_layout, infos_of,
                     output_dtypes, parse_dtype, resolve_device, resolve_weights)
from .methods import MODEL_PARAMETERS, Plan, layer_positions, make_plan, merge_tensor

Number = Union[float, int]
PerModel = Union[Number, Sequence[Number], None]


def _merge_in_memory(state_dicts: Sequence[Mapping[str, Tensor]], labels: Sequence[str], weights: List[float],
                     dtype: Optional[torch.dtype]) -> StateDict:
    infos = [infos_of(label, sd) for label, sd in zip(labels, state_dicts)]
    check_same_layout(labels, infos)
    out_dtypes = output_dtypes(infos[0], dtype, labels[0])
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
    resolved = resolve_weights(weights, len(state_dicts), normalize)
    labels = [f"state_dicts[{k}]" for k in range(len(state_dicts))]
    return _merge_in_memory(state_dicts, labels, resolved, parse_dtype(dtype))


def _task_weights(lambdas: Union[float, Sequence[float], Tensor], count: int) -> List[float]:
    """[1 - sum(lambdas), *lambdas]: the base's weight, then one per fine-tuned model."""
    if isinstance(lambdas, numbers.Real) and not isinstance(lambdas, bool):
        lambdas = [float(lambdas)] * count
    resolved = as_numbers("lambdas", lambdas)
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
    return _merge_in_memory([base, *finetuned], labels, _task_weights(lambdas, len(finetuned)), parse_dtype(dtype))


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


# --------------------------------------------------------------------------- every method, by name

def _split_parameters(params: Mapping[str, Any], count: int) -> Tuple[Dict[str, Any], Optional[List[Dict[str, Any]]]]:
    """Library keyword arguments -> (whole-merge settings, per-model settings).

    A per-model parameter (weight, density, gamma, epsilon) is one number for every model or a
    sequence of one number per model; ``t`` may be a list, read as a per-layer gradient.
    """
    general: Dict[str, Any] = {}
    per_model: List[Dict[str, Any]] = [{} for _ in range(count)]
    used = False
    for name, value in params.items():
        if value is None:
            continue
        canonical = name.rstrip("_").replace("-", "_")
        if canonical in MODEL_PARAMETERS and isinstance(value, (list, tuple, Tensor)):
            values = as_numbers(canonical, value)
            if len(values) != count:
                raise MergeParameterError(f"got {len(values)} values of {canonical} for {count} models; give one "
                                          "number for all or one per model")
            for i, v in enumerate(values):
                per_model[i][canonical] = v
            used = True
        else:
            general[name] = value
    return general, per_model if used else None


def _check_state_dicts(what: str, value: Any) -> List[Mapping[str, Tensor]]:
    if isinstance(value, Mapping) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"{what} must be a non-empty list of state dicts")
    return list(value)


def merge_models(method: str, models: Sequence[Mapping[str, Tensor]], base: Optional[Mapping[str, Tensor]] = None,
                 weights: Optional[Union[Sequence[float], Tensor]] = None, *, dtype: DTypeLike = None,
                 device: Union[str, torch.device, None] = None, seed: Optional[int] = None,
                 **params: Any) -> StateDict:
    """Merge state dicts with any method of :data:`swm_fused.merge.METHODS`, tensor by tensor.

    Args:
        method: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, ``model_stock`` or
            ``slerp`` (``-`` and ``_`` are interchangeable).
        models: K state dicts with the same keys and shapes as ``base``.
        base: the base model, for the methods that use one (every method but linear; slerp
            takes it as its t = 0 end).
        weights: one weight per model (see each method for its default).
        dtype: dtype of merged floating tensors; by default the base's (the first model's).
        device: where the arithmetic runs; by default each tensor's own device. Results land
            on the base's (first model's) device.
        seed: the seed of DARE's and DELLA's draws (random when None).
        params: the method's parameters: ``density``, ``gamma``, ``epsilon`` (a number, or one
            per model), ``lambda_``, ``normalize``, ``majority_sign``, ``rescale``,
            ``filter_wise``, ``t`` (a number, or a list: a gradient over the layers).

    Every reduction and accumulation runs in float32 (float64 for float64 inputs or outputs);
    each result is rounded once. Non-floating entries are copied from the base (first model).
    Raises :class:`~swm_fused.merge.MergeParameterError` (a ValueError) for a bad method,
    parameter or model count, and ValueError/TypeError for mismatched state dicts.
    """
    models = _check_state_dicts("models", models)
    general, per_model = _split_parameters(params, len(models))
    plan = make_plan(method, len(models), base is not None, weights=_weight_list(weights), general=general,
                     per_model=per_model, seed=seed)
    return run_plan(plan, base, models, dtype=dtype, device=device)


def _weight_list(weights: Optional[Union[Sequence[float], Tensor]]) -> Optional[List[float]]:
    return None if weights is None else as_numbers("weights", weights)


def run_plan(plan: Plan, base: Optional[Mapping[str, Tensor]], models: Sequence[Mapping[str, Tensor]], *,
             dtype: DTypeLike = None, device: Union[str, torch.device, None] = None) -> StateDict:
    """Merge in memory along a validated :class:`~swm_fused.merge.methods.Plan`."""
    out_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    inputs = ([base] if base is not None else []) + list(models)
    labels = (["base"] if base is not None else []) + [f"models[{k}]" for k in range(len(models))]
    infos = [infos_of(label, sd) for label, sd in zip(labels, inputs)]
    check_same_layout(labels, infos)
    out_dtypes = output_dtypes(infos[0], out_dtype, labels[0])
    reference = inputs[0]
    positions = layer_positions(list(reference))
    params = {key: plan.params_for(key, positions[key]) for key, t in reference.items() if t.is_floating_point()}
    merged: StateDict = {}
    for key, template in reference.items():
        if not template.is_floating_point():
            merged[key] = template.detach().clone()
            continue
        where = target if target is not None else template.device
        base_t = base[key].detach().to(where) if base is not None else None
        model_ts = [sd[key].detach().to(where) for sd in models]
        with torch.no_grad():
            result = merge_tensor(plan, key, params[key], base_t, model_ts, out_dtypes[key])
        merged[key] = result.to(template.device)
    return merged


def ties(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None, *,
         density: PerModel = None, majority_sign: Optional[str] = None, normalize: Optional[bool] = None,
         lambda_: Optional[float] = None, dtype: DTypeLike = None) -> StateDict:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Each ``delta_i`` keeps its top ``density`` fraction by magnitude (default 1: no trim); the
    sign of ``sum_i w_i delta_i`` (``majority_sign="sum"``) or the majority of signs (``"count"``)
    is elected per entry (>= 0 counts as +); entries that agree are summed, weighted, and with
    ``normalize`` (default True) divided by the sum of their weights. Weights default to 1.
    Output: ``base + lambda_ * mixed``. See docs/merge_methods.md.
    """
    return merge_models("ties", models, base, weights, dtype=dtype, density=density, majority_sign=majority_sign,
                        normalize=normalize, lambda_=lambda_)


def dare_linear(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None, *,
                density: PerModel = None, rescale: Optional[str] = None, normalize: Optional[bool] = None,
                lambda_: Optional[float] = None, seed: Optional[int] = None, dtype: DTypeLike = None) -> StateDict:
    """DARE (Yu et al. 2023) with a weighted sum: drop each delta entry with probability 1 - density, rescale.

    ``rescale="density"`` (default) divides the kept entries by density, as the paper does;
    ``"l1"`` matches each task vector's L1 norm instead (mergekit's choice); ``"none"`` keeps them
    as they are. ``normalize`` (default False) divides by the sum of the weights (default 1 each).
    """
    return merge_models("dare_linear", models, base, weights, dtype=dtype, seed=seed, density=density,
                        rescale=rescale, normalize=normalize, lambda_=lambda_)


def dare_ties(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None, *,
              density: PerModel = None, rescale: Optional[str] = None, majority_sign: Optional[str] = None,
              normalize: Optional[bool] = None, lambda_: Optional[float] = None, seed: Optional[int] = None,
              dtype: DTypeLike = None) -> StateDict:
    """DARE's drop and rescale (:func:`dare_linear`), then TIES' sign election (:func:`ties`); normalize defaults to False."""
    return merge_models("dare_ties", models, base, weights, dtype=dtype, seed=seed, density=density,
                        rescale=rescale, majority_sign=majority_sign, normalize=normalize, lambda_=lambda_)


def breadcrumbs(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None, *,
                density: PerModel = None, gamma: PerModel = None, normalize: Optional[bool] = None,
                lambda_: Optional[float] = None, dtype: DTypeLike = None) -> StateDict:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top ``gamma`` (default 0.01) and the bottom
    ``1 - density - gamma`` of each ``|delta_i|``, then a weighted sum."""
    return merge_models("breadcrumbs", models, base, weights, dtype=dtype, density=density, gamma=gamma,
                        normalize=normalize, lambda_=lambda_)


def breadcrumbs_ties(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None,
                     *, density: PerModel = None, gamma: PerModel = None, majority_sign: Optional[str] = None,
                     normalize: Optional[bool] = None, lambda_: Optional[float] = None,
                     dtype: DTypeLike = None) -> StateDict:
    """Breadcrumbs' mask, then TIES' sign election (normalize defaults to False, as in mergekit)."""
    return merge_models("breadcrumbs_ties", models, base, weights, dtype=dtype, density=density, gamma=gamma,
                        majority_sign=majority_sign, normalize=normalize, lambda_=lambda_)


def della(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None, *,
          density: PerModel = None, epsilon: PerModel = None, rescale: Optional[str] = None,
          majority_sign: Optional[str] = None, normalize: Optional[bool] = None, lambda_: Optional[float] = None,
          seed: Optional[int] = None, dtype: DTypeLike = None) -> StateDict:
    """DELLA (Deep et al. 2024): keep probabilities from density - epsilon to density + epsilon by
    magnitude rank (per row), drop, rescale by each entry's keep probability, then TIES' sign election."""
    return merge_models("della", models, base, weights, dtype=dtype, seed=seed, density=density, epsilon=epsilon,
                        rescale=rescale, majority_sign=majority_sign, normalize=normalize, lambda_=lambda_)


def della_linear(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: PerModel = None, *,
                 density: PerModel = None, epsilon: PerModel = None, rescale: Optional[str] = None,
                 normalize: Optional[bool] = None, lambda_: Optional[float] = None, seed: Optional[int] = None,
                 dtype: DTypeLike = None) -> StateDict:
    """DELLA's drop and rescale (:func:`della`), then a weighted sum."""
    return merge_models("della_linear", models, base, weights, dtype=dtype, seed=seed, density=density,
                        epsilon=epsilon, rescale=rescale, normalize=normalize, lambda_=lambda_)


def model_stock(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], *, filter_wise: bool = False,
                dtype: DTypeLike = None) -> StateDict:
    """Model Stock (Jang et al. 2024): ``t * mean_i theta_i + (1 - t) * base`` with
    ``t = N c / (1 + (N - 1) c)``, c the mean pairwise cosine of the deltas, per tensor or per
    row (``filter_wise``). Needs N >= 2 models."""
    return merge_models("model_stock", models, base, dtype=dtype, filter_wise=filter_wise)


def slerp(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: Union[float, Sequence[float]], *,
          dtype: DTypeLike = None) -> StateDict:
    """Spherical interpolation of each flattened tensor from ``a`` (t = 0) to ``b`` (t = 1).

    Falls back to lerp when the two are nearly (anti)parallel (|cos| > 0.9995). ``t`` in [0, 1],
    or a list of such values: a gradient over the layers, interpolated as mergekit does
    (:func:`swm_fused.merge.methods.layer_positions`).
    """
    return merge_models("slerp", [b], a, dtype=dtype, t=list(t) if isinstance(t, (list, tuple)) else t)
