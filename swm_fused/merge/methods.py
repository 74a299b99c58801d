"""The merge methods: their parameters, how parameters resolve per tensor, and the per-tensor math.

Notation (docs/merge_methods.md has every formula with its source): ``delta_i = theta_i - theta_base``
for each model i with weight ``w_i``; the delta-based methods output ``theta_base + lambda * mixed``.

Every method here is a function of one tensor's K (+ base) inputs, so :func:`merge_tensor` serves
the in-memory merges and the streamed file merges alike. Every reduction (norms, cosines, sums,
top-k thresholds) and every accumulation runs in float32, or float64 when an input or the output
is float64, on the inputs' device; the result is rounded once, into the output dtype.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops import merge_, ties_merge_
from .common import MergeParameterError, normalized
from .kernels import MAJORITY_SIGNS, RESCALES, compute_dtype, drop_and_rescale_, uniform

# --------------------------------------------------------------------------- the methods and their parameters

MODEL_PARAMETERS = ("weight", "density", "gamma", "epsilon")  # per model (or one value for all models)
GLOBAL_PARAMETERS = ("normalize", "lambda", "t", "majority_sign", "rescale", "filter_wise", "seed")
IGNORED_PARAMETERS = ("int8_mask",)  # mergekit's memory option: accepted, has no effect here

DEFAULTS: Dict[str, Any] = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0,
                            "majority_sign": "sum", "rescale": "density", "filter_wise": False}


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its name, what it needs, and the parameters it takes."""

    name: str
    summary: str
    base: str  # "required", "optional" (slerp: the t = 0 end) or "none"
    min_models: int
    parameters: Tuple[str, ...]
    normalize_default: bool = False
    sparsify: Optional[str] = None  # None, "magnitude", "random", "magnitude_outliers", "della"
    consensus: bool = False  # TIES sign election
    weights_required: bool = False

    @property
    def random(self) -> bool:
        return self.sparsify in ("random", "della")


def _gta(name: str, summary: str, sparsify: Optional[str], consensus: bool, normalize: bool) -> MethodSpec:
    params = ["weight", "normalize", "lambda"]
    if sparsify is not None:
        params.append("density")
    if sparsify == "magnitude_outliers":
        params.append("gamma")
    if sparsify == "della":
        params.append("epsilon")
    if sparsify in ("random", "della"):
        params += ["rescale", "seed"]
    if consensus:
        params.append("majority_sign")
    return MethodSpec(name, summary, "required", 1, tuple(params), normalize, sparsify, consensus,
                      weights_required=name == "task_arithmetic")


METHOD_SPECS: Dict[str, MethodSpec] = {spec.name: spec for spec in [
    MethodSpec("linear", "sum_i w_i theta_i (weights scaled to sum 1 unless normalize=False)", "none", 1,
               ("weight", "normalize"), normalize_default=True),
    _gta("task_arithmetic", "base + lambda sum_i w_i delta_i (Ilharco et al. 2023)", None, False, False),
    _gta("ties", "trim to the top density by |delta|, elect signs, disjoint mean (Yadav et al. 2023)",
         "magnitude", True, True),
    _gta("dare_linear", "drop with probability 1 - density, rescale, sum (Yu et al. 2023)", "random", False, False),
    _gta("dare_ties", "DARE's drop and rescale, then TIES' sign election (Yu et al. 2023)", "random", True, False),
    _gta("breadcrumbs", "drop the top gamma and the bottom 1 - density - gamma by |delta|, sum "
                        "(Davari & Belilovsky 2023)", "magnitude_outliers", False, False),
    _gta("breadcrumbs_ties", "breadcrumbs' mask, then TIES' sign election", "magnitude_outliers", True, False),
    _gta("della", "magnitude-ranked keep probabilities density +- epsilon, rescale, TIES' sign election "
                  "(Deep et al. 2024)", "della", True, True),
    _gta("della_linear", "DELLA's drop and rescale, then a weighted sum", "della", False, False),
    MethodSpec("model_stock", "t mean_i theta_i + (1 - t) base, t from the deltas' mean cosine "
                              "(Jang et al. 2024)", "required", 2, ("filter_wise",)),
    MethodSpec("slerp", "spherical interpolation between two models at t (Shoemake 1985)", "optional", 1, ("t",)),
]}
METHODS = tuple(METHOD_SPECS)
METHOD_ALIASES = {name.replace("_", "-"): name for name in METHODS if "_" in name}


def canonical_method(method: Any) -> MethodSpec:
    """The spec of ``method`` (a name from :data:`METHODS`; ``-`` and ``_`` are interchangeable)."""
    if not isinstance(method, str):
        raise MergeParameterError(f"method must be a name such as 'ties', got {type(method).__name__}")
    name = method.strip().lower().replace("-", "_")
    if name not in METHOD_SPECS:
        raise MergeParameterError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_SPECS[name]


# --------------------------------------------------------------------------- parameter values and settings

class Gradient(NamedTuple):
    """mergekit's gradient: anchor values spread evenly over the layers, linearly interpolated."""
    values: Tuple[float, ...]


class Filtered(NamedTuple):
    """mergekit's conditional list: the first entry whose filter is a substring of the tensor name wins."""
    entries: Tuple[Tuple[Optional[str], Any], ...]


Setting = Any  # a scalar, a Gradient or a Filtered


def _check_scalar(name: str, value: Any, where: str) -> Any:
    """Validate one scalar value of parameter ``name``; return it in canonical form."""
    what = f"{name} {where}".strip()
    if name in ("normalize", "filter_wise", "int8_mask"):
        if not isinstance(value, bool):
            raise MergeParameterError(f"{what} must be true or false, got {value!r}")
        return value
    if name == "majority_sign":
        if value not in MAJORITY_SIGNS:
            raise MergeParameterError(f"{what} must be one of {', '.join(MAJORITY_SIGNS)}, got {value!r}")
        return value
    if name == "rescale":
        if value is True:
            return DEFAULTS["rescale"]
        if value is False or value is None:
            return "none"
        if value not in RESCALES:
            raise MergeParameterError(f"{what} must be one of {', '.join(RESCALES)} (or true/false), got {value!r}")
        return value
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise MergeParameterError(f"{what} must be a non-negative integer, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MergeParameterError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise MergeParameterError(f"{what} must be finite, got {value}")
    if name == "density" and not 0.0 < value <= 1.0:
        raise MergeParameterError(f"{what} must be in (0, 1], got {value}")
    if name == "t" and not 0.0 <= value <= 1.0:
        raise MergeParameterError(f"{what} must be in [0, 1], got {value}")
    if name in ("gamma", "epsilon") and not 0.0 <= value < 1.0:
        raise MergeParameterError(f"{what} must be in [0, 1), got {value}")
    return value


NUMERIC = ("weight", "density", "gamma", "epsilon", "lambda", "t")


def check_setting(name: str, value: Any, where: str = "") -> Setting:
    """A parameter's value as given: a scalar, a gradient list (numbers) or a list of {filter, value}.

    Every scalar inside is range-checked here, so a bad value fails before anything is read.
    """
    if isinstance(value, (Gradient, Filtered)):
        return value
    if isinstance(value, Mapping):
        return Filtered((_filter_entry(name, value, where),))
    if isinstance(value, (list, tuple)):
        if not value:
            raise MergeParameterError(f"{name} {where}: an empty list is not a value".replace("  ", " "))
        if all(isinstance(v, Mapping) for v in value):
            return Filtered(tuple(_filter_entry(name, v, where) for v in value))
        if name not in NUMERIC:
            raise MergeParameterError(f"{name} {where} takes one value, not a list".replace("  ", " "))
        return Gradient(tuple(_check_scalar(name, v, where) for v in value))
    return _check_scalar(name, value, where)


def _filter_entry(name: str, entry: Mapping, where: str) -> Tuple[Optional[str], Any]:
    unknown = set(entry) - {"filter", "value"}
    if unknown or "value" not in entry:
        raise MergeParameterError(f"{name} {where}: a conditional value is {{filter: NAME-PART, value: V}}, "
                                  f"got {dict(entry)!r}")
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise MergeParameterError(f"{name} {where}: filter must be a string, got {flt!r}")
    return (None if flt in (None, "*") else flt), check_setting(name, entry["value"], where)


def evaluate(setting: Setting, key: str, position: float) -> Any:
    """The value of ``setting`` for tensor ``key`` at ``position`` in [0, 1] through the layers (mergekit's rules)."""
    if isinstance(setting, Gradient):
        values = setting.values
        scaled = position * (len(values) - 1)
        i0 = min(int(math.floor(scaled)), len(values) - 1)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1.0 - frac) * values[i0] + frac * values[i1]
    if isinstance(setting, Filtered):
        for flt, value in setting.entries:
            if flt is None or flt in key:
                return evaluate(value, key, position)
        return None
    return setting


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_EMBEDDING_NAMES = ("embed", "wte", "wpe", "tok_embeddings", "word_embeddings")


def layer_positions(keys: Sequence[str]) -> Dict[str, float]:
    """Each tensor's place in [0, 1] through the layers, which gradients interpolate over (as mergekit).

    A tensor's layer is the first purely numeric part of its dotted name (``model.layers.7.mlp...``
    is layer 7); with L layers, layer i sits at ``i / (L - 1)``. Tensors outside the layers sit at
    0 when their name marks an embedding (``embed``, ``wte``, ``wpe``...), else at 1 (final norms,
    output heads), as mergekit places its pre- and post-layer weights.
    """
    indexes: Dict[str, Optional[int]] = {}
    for key in keys:
        match = _LAYER_INDEX.search(key)
        indexes[key] = int(match.group(1)) if match else None
    count = 1 + max((i for i in indexes.values() if i is not None), default=-1)
    positions = {}
    for key, index in indexes.items():
        if index is not None:
            positions[key] = index / (count - 1) if count > 1 else 1.0
        else:
            positions[key] = 0.0 if any(part in key.lower() for part in _EMBEDDING_NAMES) else 1.0
    return positions


class TensorParams(NamedTuple):
    """The parameters of one tensor's merge: whole-merge values, then one dict per model."""
    general: Dict[str, Any]
    models: List[Dict[str, Any]]


@dataclass
class Plan:
    """A validated merge request: method, model count, and the parameters as given (maybe per tensor)."""

    spec: MethodSpec
    n_models: int
    has_base: bool
    general: Dict[str, Setting] = field(default_factory=dict)
    per_model: List[Dict[str, Setting]] = field(default_factory=list)
    seed: Optional[int] = None

    @property
    def varies_by_tensor(self) -> bool:
        settings = list(self.general.values()) + [v for m in self.per_model for v in m.values()]
        return any(isinstance(s, (Gradient, Filtered)) for s in settings)

    def params_for(self, key: str, position: float) -> TensorParams:
        """Every parameter's value for tensor ``key``, defaults filled in, ranges and combinations checked."""
        spec = self.spec
        where = f"for tensor {key!r}"

        def value(name: str, setting: Setting) -> Any:
            result = evaluate(setting, key, position)
            return None if result is None else _check_scalar(name, result, where)

        general: Dict[str, Any] = {}
        for name in spec.parameters:
            if name in MODEL_PARAMETERS or name == "seed":
                continue
            given = value(name, self.general[name]) if name in self.general else None
            if given is None:
                if name == "normalize":
                    given = spec.normalize_default
                elif name == "t":
                    raise MergeParameterError("method 'slerp' requires t, the interpolation point in [0, 1] "
                                              "(t=, --t, or parameters: t: in a config)")
                else:
                    given = DEFAULTS[name]
            general[name] = given
        models = []
        for i in range(self.n_models):
            params = {}
            for name in spec.parameters:
                if name not in MODEL_PARAMETERS:
                    continue
                given = None
                if i < len(self.per_model) and name in self.per_model[i]:
                    given = value(name, self.per_model[i][name])
                if given is None and name in self.general:
                    given = value(name, self.general[name])
                if given is None:
                    if name == "weight" and spec.weights_required:
                        raise MergeParameterError(
                            f"method {spec.name!r} needs a base and one weight (lambda) per model: it requires "
                            "--weights (weights=, or models[].parameters.weight in a config)")
                    given = DEFAULTS[name]
                params[name] = given
            _check_combination(spec, params, f"model {i} {where}")
            models.append(params)
        if spec.name in ("linear", "task_arithmetic") or spec.sparsify and not spec.consensus:
            if general.get("normalize"):
                normalized([m["weight"] for m in models])  # raises when they sum to 0
        return TensorParams(general, models)


def _check_combination(spec: MethodSpec, params: Dict[str, Any], where: str) -> None:
    density = params.get("density", 1.0)
    if density >= 1.0:
        return
    if spec.sparsify == "magnitude_outliers" and density + params["gamma"] > 1.0 + 1e-12:
        raise MergeParameterError(f"density + gamma must be at most 1 ({where}): got density {density} and "
                                  f"gamma {params['gamma']}")
    if spec.sparsify == "della":
        eps = params["epsilon"]
        if not (density - eps > 0.0 and density + eps <= 1.0 + 1e-12):
            raise MergeParameterError(f"the keep probabilities density +- epsilon must lie in (0, 1] ({where}): "
                                      f"got density {density} and epsilon {eps}; choose a smaller epsilon")


def make_plan(method: Any, n_models: int, has_base: bool, *, weights: Optional[Sequence[Setting]] = None,
              general: Optional[Mapping[str, Any]] = None, per_model: Optional[Sequence[Mapping[str, Any]]] = None,
              seed: Optional[int] = None, seed_source: Optional[Callable[[], int]] = None) -> Plan:
    """Check a merge request (method, model count, base, parameter names and values) and return its Plan.

    ``general`` holds whole-merge parameters and per-model parameters meant for every model;
    ``per_model`` holds one mapping per model; ``weights`` one weight setting per model. Raises
    :class:`MergeParameterError` for an unknown method or parameter, a missing base or a base
    that the method does not use, a wrong model count, or a value out of range.
    """
    spec = canonical_method(method)
    if spec.base == "required" and not has_base:
        raise MergeParameterError(f"method {spec.name!r} needs a base model: it requires --base "
                                  "(base=, or base_model: in a config)")
    if spec.base == "none" and has_base:
        raise MergeParameterError(f"method {spec.name!r} does not use a base model; drop --base (base=, base_model:) "
                                  "or choose a method that uses one, such as task_arithmetic or ties")
    if spec.name == "slerp":
        if n_models + has_base != 2:
            given = f"a base and {n_models}" if has_base else f"{n_models}"
            raise MergeParameterError(f"method 'slerp' interpolates between exactly two models, got {given}")
    elif n_models < spec.min_models:
        needed = f"a base and at least {spec.min_models} models" if spec.base == "required" and \
            spec.min_models > 1 else f"at least {spec.min_models} model{'s' if spec.min_models > 1 else ''}"
        raise MergeParameterError(f"method {spec.name!r} needs {needed}, got {n_models}")

    general_settings: Dict[str, Setting] = {}
    for raw_name, value in (general or {}).items():
        name = _parameter_name(spec, raw_name)
        if name is None:
            continue
        general_settings[name] = check_setting(name, value, "")
    model_settings: List[Dict[str, Setting]] = [{} for _ in range(n_models)]
    if per_model is not None:
        if len(per_model) != n_models:
            raise MergeParameterError(f"got parameters for {len(per_model)} models but there are {n_models}")
        for i, params in enumerate(per_model):
            for raw_name, value in (params or {}).items():
                name = _parameter_name(spec, raw_name, model=i)
                if name is None:
                    continue
                model_settings[i][name] = check_setting(name, value, f"of model {i}")
    if weights is not None:
        if "weight" not in spec.parameters:
            raise MergeParameterError(f"method {spec.name!r} takes no weights")
        if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
        if len(weights) != n_models:
            raise MergeParameterError(f"got {len(weights)} weights for {n_models} models; give one weight per model")
        for i, w in enumerate(weights):
            model_settings[i]["weight"] = check_setting("weight", w, f"of model {i}")
    if "seed" in general_settings:
        given = general_settings.pop("seed")
        if seed is not None and seed != given:
            raise MergeParameterError(f"two seeds given ({seed} and {given}); give one")
        seed = given
    if spec.weights_required and not ("weight" in general_settings or all("weight" in m for m in model_settings)):
        raise MergeParameterError(f"method {spec.name!r} needs a base and one weight (lambda) per model: it "
                                  "requires --weights (weights=, or models[].parameters.weight in a config)")
    if seed is not None:
        seed = _check_scalar("seed", seed, "")
        if not spec.random:
            raise MergeParameterError(f"method {spec.name!r} draws nothing at random and takes no seed")
    elif spec.random:
        seed = seed_source() if seed_source is not None else int(torch.randint(0, 2**62, ()).item())
    plan = Plan(spec, n_models, has_base, general_settings, model_settings, seed)
    if not plan.varies_by_tensor:
        plan.params_for("", 0.0)  # the same for every tensor: check ranges and combinations now
    return plan


def _parameter_name(spec: MethodSpec, raw: Any, model: Optional[int] = None) -> Optional[str]:
    """The canonical name of parameter ``raw`` for ``spec``; None for accepted-and-ignored ones."""
    if not isinstance(raw, str):
        raise MergeParameterError(f"parameter names are strings, got {raw!r}")
    name = raw.strip().replace("-", "_")
    name = {"lambda_": "lambda", "weights": "weight", "lam": "lambda"}.get(name, name)
    if name in IGNORED_PARAMETERS:
        return None
    if name not in spec.parameters:
        takes = ", ".join(spec.parameters)
        raise MergeParameterError(f"unknown parameter {raw!r} for method {spec.name!r} (it takes: {takes})")
    if model is not None and name not in MODEL_PARAMETERS:
        raise MergeParameterError(f"parameter {raw!r} applies to the whole merge, not to model {model}; "
                                  "give it once (top-level parameters in a config)")
    return name


# --------------------------------------------------------------------------- the per-tensor math

def _kth_largest(values: Tensor, m: int) -> Tensor:
    """The m-th largest of ``values`` (flattened), 1 <= m <= numel, as a 0-d tensor on their device (no host
    sync): a selection, not a sort."""
    flat = values.reshape(-1)
    return torch.kthvalue(flat, flat.numel() - m + 1).values


def _count(fraction: float, n: int) -> int:
    """round(fraction * n), halves up: how many entries a fraction of n means."""
    return int(math.floor(fraction * n + 0.5))


def magnitude_threshold(magnitudes: Tensor, density: float) -> Tensor:
    """TIES' trim: the k-th largest ``|delta|`` with ``k = round(density * n)`` (at least 1), a 0-d tensor; keep
    ``|delta| >= it``."""
    n = magnitudes.numel()
    k = min(max(_count(density, n), 1), n)
    return _kth_largest(magnitudes, k)


def breadcrumbs_thresholds(magnitudes: Tensor, density: float, gamma: float) -> Tuple[Tensor, Tensor]:
    """Breadcrumbs' band ``(lo, hi)`` as 0-d tensors: keep ``lo <= |delta| < hi``.

    ``n_top = round(gamma * n)`` (at most n - 1) largest entries go, then
    ``k = round(density * n)`` (at least 1, at most n - n_top) are kept: ``hi`` is the n_top-th
    largest |delta| (infinity when n_top = 0) and ``lo`` the (n_top + k)-th largest.
    """
    n = magnitudes.numel()
    n_top = min(_count(gamma, n), n - 1)
    k = min(max(_count(density, n), 1), n - n_top)
    hi = _kth_largest(magnitudes, n_top) if n_top > 0 else magnitudes.new_full((), math.inf)
    lo = _kth_largest(magnitudes, n_top + k)
    return lo, hi


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune: per row, keep probabilities rising with |delta|'s rank, float64.

    Rows are ``delta.reshape(shape[0], -1)`` (the whole tensor for 0-d and 1-d ones). In a row of
    n entries, ranks r = 0..n-1 go in increasing |delta| (ties in index order: a stable sort), and
    ``p = (density - epsilon) + 2 * epsilon * r / (n - 1)`` (``p = density`` when n = 1): from
    density - epsilon for the smallest to density + epsilon for the largest, density on average.
    """
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    if n <= 1:
        return torch.full(delta.shape, float(density), dtype=torch.float64, device=delta.device)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    by_rank = torch.arange(n, dtype=torch.float64, device=delta.device).mul_(2.0 * epsilon / (n - 1))
    by_rank.add_(density - epsilon)  # p of rank r, r = 0..n-1
    p = torch.empty(rows.shape, dtype=torch.float64, device=delta.device)
    p.scatter_(1, order, by_rank.expand(rows.shape))
    return p.reshape(delta.shape)


class TaskVectors:
    """The K task vectors of one tensor, ``theta_i - theta_base`` in the compute dtype, and their sparsification.

    Magnitude sparsifiers (ties, breadcrumbs) keep each model's entries within a band of |delta| that
    :meth:`thresholds` finds (one selection per model); the fused merge then reads the models themselves.
    Random sparsifiers (dare, della) need each task vector dropped and rescaled first: item i is that
    tensor, drawn from the same seed whenever it is read.
    """

    def __init__(self, spec: MethodSpec, key: str, base: Tensor, models: Sequence[Tensor],
                 params: TensorParams, seed: Optional[int], dtype: torch.dtype):
        self.spec, self.key, self.base, self.models = spec, key, base, models
        self.params, self.seed, self.dtype = params, seed, dtype

    def __len__(self) -> int:
        return len(self.models)

    def delta(self, i: int) -> Tensor:
        return torch.sub(self.models[i].to(self.dtype), self.base)

    def trims(self, i: int) -> bool:
        """Whether model i's task vector is sparsified at all (density < 1 and a non-empty tensor)."""
        return self.spec.sparsify is not None and self.params.models[i]["density"] < 1.0 and self.base.numel() > 0

    def thresholds(self) -> Optional[Tensor]:
        """ties_merge_'s (K, 1, 2) bands [lo, hi) of kept |delta| for a magnitude sparsifier, on the tensors'
        device (models that keep everything get [-inf, inf)); None when no model is trimmed."""
        if self.spec.sparsify not in ("magnitude", "magnitude_outliers") or not any(map(self.trims, range(len(self)))):
            return None
        bands = torch.empty((len(self), 1, 2), dtype=self.dtype, device=self.base.device)
        bands[:, :, 0], bands[:, :, 1] = -math.inf, math.inf
        for i, params in enumerate(self.params.models):
            if not self.trims(i):
                continue
            magnitudes = self.delta(i).abs_()
            if self.spec.sparsify == "magnitude":
                bands[i, 0, 0] = magnitude_threshold(magnitudes, params["density"])
            else:
                lo, hi = breadcrumbs_thresholds(magnitudes, params["density"], params["gamma"])
                bands[i, 0, 0], bands[i, 0, 1] = lo, hi
            del magnitudes
        return bands

    def __getitem__(self, i: int) -> Tensor:
        """Task vector i, dropped and rescaled when a random sparsifier trims it (a new tensor each time)."""
        if not 0 <= i < len(self.models):
            raise IndexError(i)
        delta = self.delta(i)
        if not self.spec.random or not self.trims(i):
            return delta
        params = self.params.models[i]
        u = uniform(self.seed, self.key, i, delta.shape, delta.device)
        rescale = self.params.general["rescale"]
        if self.spec.sparsify == "random":
            return drop_and_rescale_(delta, u, params["density"], rescale)
        p = della_keep_probabilities(delta, params["density"], params["epsilon"])
        return drop_and_rescale_(delta, u, p, rescale)


def merge_tensor(plan: Plan, key: str, params: TensorParams, base: Optional[Tensor], models: Sequence[Tensor],
                 out_dtype: torch.dtype) -> Tensor:
    """Merge one tensor: ``base`` (or None) and the K ``models``' tensors, all on one device.

    Returns a new tensor of ``out_dtype`` on that device.
    """
    spec = plan.spec
    device = models[0].device
    weights = [m.get("weight", 1.0) for m in params.models]
    dtypes = [t.dtype for t in models] + ([base.dtype] if base is not None else []) + [out_dtype]
    cdtype = compute_dtype(*dtypes)
    if spec.name == "linear":
        coefficients = normalized(weights) if params.general["normalize"] else weights
        out = torch.empty(models[0].shape, dtype=out_dtype, device=device)
        merge_(out, list(models), coefficients)
        return out
    if spec.name == "task_arithmetic":
        lam = params.general["lambda"]
        divisor = math.fsum(weights) if params.general["normalize"] else 1.0
        coefficients = [lam * w / divisor for w in weights]
        out = torch.empty(base.shape, dtype=out_dtype, device=device)
        merge_(out, [base, *models], [1.0 - math.fsum(coefficients), *coefficients])
        return out
    if spec.name == "slerp":
        ends = [base, *models] if base is not None else list(models)
        return slerp_tensor(ends[0], ends[1], params.general["t"], out_dtype, cdtype)
    if spec.name == "model_stock":
        return model_stock_tensor(base, models, params.general["filter_wise"], out_dtype, cdtype)
    # Every other method is one ties_merge_ pass over the models (or, when dropped at random, over their
    # sparsified task vectors): trim, elect (consensus methods), weighted sum, base + lambda * mixed.
    vectors = TaskVectors(spec, key, base, models, params, plan.seed, cdtype)
    dropped = spec.random and any(map(vectors.trims, range(len(vectors))))
    inputs = [vectors[i] for i in range(len(vectors))] if dropped else list(models)
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    ties_merge_(out, [[x] for x in inputs], weights, base=base, thresholds=vectors.thresholds(),
                majority_sign=params.general["majority_sign"] if spec.consensus else None,
                normalize=params.general["normalize"], scale=params.general["lambda"], task_vectors=dropped)
    return out


SLERP_LERP_ABOVE = 0.9995  # |cos| above this: the ends are (anti)parallel, and slerp falls back to lerp


def slerp_coefficients(cos: Optional[float], t: float) -> Tuple[float, float]:
    """``(s0, s1)`` with slerp = ``s0 * a + s1 * b``; lerp's ``(1 - t, t)`` when cos is None or |cos| > 0.9995."""
    if cos is None or abs(cos) > SLERP_LERP_ABOVE:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_tensor(a: Tensor, b: Tensor, t: float, out_dtype: torch.dtype, cdtype: torch.dtype) -> Tensor:
    """Spherical interpolation of the flattened tensors: ``s0 * a + s1 * b`` (see :func:`slerp_coefficients`).

    ``cos = <a, b> / (|a| |b|)``, reduced in the compute dtype; a zero end makes it undefined, and
    slerp falls back to lerp.
    """
    flat_a = a.reshape(-1).to(cdtype)
    flat_b = b.reshape(-1).to(cdtype)
    norm_a = float(torch.linalg.vector_norm(flat_a))
    norm_b = float(torch.linalg.vector_norm(flat_b))
    cos = None
    if norm_a > 0 and norm_b > 0 and math.isfinite(norm_a * norm_b):
        cos = max(-1.0, min(1.0, float(torch.dot(flat_a, flat_b)) / norm_a / norm_b))
    del flat_a, flat_b
    s0, s1 = slerp_coefficients(cos, t)
    out = torch.empty(a.shape, dtype=out_dtype, device=a.device)
    merge_(out, [a, b], [s0, s1])
    return out


GRAM_CHUNK = 1 << 20  # elements per block of the chunked Gram matrix: bounds model_stock's temporaries


def model_stock_t(gram: Tensor, n: int) -> Tensor:
    """Model Stock's ratio from the Gram matrices of the deltas, ``(..., N, N)`` -> ``(...)``, float64.

    ``c`` is the mean of the N(N-1)/2 pairwise cosines (a pair with a zero delta counts as 0),
    taken as 0 when negative, and ``t = N c / (1 + (N - 1) c)``, in [0, 1]. (For c < 0 the
    formula gives t < 0, diverging as c approaches -1/(N-1), the smallest mean cosine N vectors
    can have; the paper's geometry assumes c > 0, and t = 0 keeps the base.)
    """
    gram = gram.to(torch.float64)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    outer = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    cos = torch.where(outer > 0, gram / torch.where(outer > 0, outer, torch.ones_like(outer)),
                      torch.zeros_like(gram)).clamp(-1.0, 1.0)
    upper = torch.triu_indices(n, n, offset=1, device=gram.device)
    c = cos[..., upper[0], upper[1]].mean(dim=-1).clamp(0.0, 1.0)
    return n * c / (1.0 + (n - 1) * c)


def model_stock_tensor(base: Tensor, models: Sequence[Tensor], filter_wise: bool, out_dtype: torch.dtype,
                       cdtype: torch.dtype) -> Tensor:
    """Model Stock: ``t * mean_i theta_i + (1 - t) * theta_base``, t per tensor or per row (``filter_wise``)."""
    n = len(models)
    device = base.device
    if filter_wise:
        rows = base.shape[0] if base.dim() >= 2 else 1
        cols = base.numel() // rows if rows else 0
        gram = torch.zeros(rows, n, n, dtype=cdtype, device=device)
        step = max(1, GRAM_CHUNK // max(cols, 1))
        base2 = base.reshape(rows, cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = torch.stack([m.reshape(rows, cols)[r0:r1].to(cdtype) - base2[r0:r1] for m in models])
            gram[r0:r1] = torch.einsum("irc,jrc->rij", block, block)
            del block
        t = model_stock_t(gram, n).to(cdtype)
        acc = torch.zeros(base.shape, dtype=cdtype, device=device)
        for m in models:
            acc.add_(m)
        acc.div_(n).sub_(base)
        acc.reshape(rows, cols).mul_(t.unsqueeze(1))
        return acc.add_(base).to(out_dtype)
    flat_base = base.reshape(-1)
    gram = torch.zeros(n, n, dtype=cdtype, device=device)
    for s in range(0, flat_base.numel(), GRAM_CHUNK):
        e = min(flat_base.numel(), s + GRAM_CHUNK)
        block = torch.stack([m.reshape(-1)[s:e].to(cdtype) - flat_base[s:e] for m in models])
        gram += block @ block.T
        del block
    t = float(model_stock_t(gram, n))
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    merge_(out, [base, *models], [1.0 - t, *([t / n] * n)])
    return out
