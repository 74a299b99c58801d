"""The functional ops: turn the arguments into tensor lists and numbers, then run the backend's kernels.

All ops work in place on lists of tensors paired by position (a single tensor or a
:class:`~swm_fused.FlatBuffer` may stand in for a list). Nothing is written until every
check has passed, so a bad call leaves all tensors unchanged.

Who checks what (each rule in one place, the same for every backend; docs/design.md):
- here: argument types (a Tensor, a list of Tensors or a FlatBuffer), the numbers
  (decay, n_averaged, weights) and, for merges, that each of the K input lists has as
  many tensors as ``out`` (their k-major flattening needs it);
- csrc/validate.h: everything about the tensors (list lengths, dtypes, shapes, devices,
  the one-element ``found_inf``), run in front of every backend's kernels.
The message of a failed tensor check gets the op's name prefixed here.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

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
    if not all(map(isinstance, value, itertools.repeat(Tensor))):  # C-speed scan; find the culprit below
        i, t = next((i, t) for i, t in enumerate(value) if not isinstance(t, Tensor))
        raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")
    return value if isinstance(value, list) else list(value)


def _check_number(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def _check_decay(op: str, decay) -> float:
    decay = _check_number(op, "decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{op}: decay must be in [0, 1], got {decay}")
    return decay


def _check_flag_type(op: str, found_inf: Optional[Tensor]) -> None:
    if found_inf is not None and not isinstance(found_inf, Tensor):
        raise TypeError(f"{op}: found_inf must be a Tensor or None, got {type(found_inf).__name__}")


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


def _flat_storages(args: Sequence[TensorList]) -> Optional[List[List[Tensor]]]:
    """When every argument is a FlatBuffer with one layout, their storages, paired; else None."""
    if not all(isinstance(x, FlatBuffer) for x in args):
        return None
    if len({x.layout_key() for x in args}) != 1:
        return None
    return [x.storages for x in args]


def _run(op: str, primitive: str, lists: List[List[Tensor]], args: Sequence[TensorList], check: Callable,
         rest: Tuple = (), check_rest: Tuple = (), pack: Callable = tuple) -> Any:
    """Run ``primitive(*pack(lists), *rest)`` on the backend for the tensors' device (``pack`` groups
    lists that go as one argument, such as a merge's K inputs).

    FlatBuffers of one layout hand their storages over instead of their views: one kernel
    per storage. The backend validates first (csrc/validate.h); a failed check raises with
    ``op: `` prefixed, and when storages stood in for views, the views are checked again so
    the message names a view index, as it would for a list.
    """
    storages = _flat_storages(args)
    operands = lists if storages is None else storages
    backend = dispatch.select(operands[0][0].device)
    try:
        with torch.no_grad():
            return getattr(backend.kernels, primitive)(*pack(operands), *rest)
    except (ValueError, TypeError) as exc:
        if storages is not None:
            try:
                check(*lists, *check_rest)
            except (ValueError, TypeError) as view_exc:
                exc = view_exc
        raise type(exc)(f"{op}: {exc}") from None


def _validator() -> Any:
    """``torch.ops.swm_fused``, whose check_* ops run csrc/validate.h; RuntimeError without the extension."""
    dispatch.get_backend("reference")  # loads swm_fused._C, or says why it cannot
    return torch.ops.swm_fused


def _prefixed(op: str, check: str, *args: Any) -> None:
    """Run the check op named ``check`` alone (lists with nothing to do), prefixing ``op: `` to its message."""
    try:
        getattr(_validator(), check)(*args)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{op}: {exc}") from None


def _check_lerp(avgs: List[Tensor], srcs: List[Tensor], weight_tensor: Optional[Tensor],
                found_inf: Optional[Tensor]) -> None:
    _validator().check_lerp_(avgs, srcs, weight_tensor, found_inf)


def _check_swag(means: List[Tensor], sq_means: List[Tensor], srcs: List[Tensor], weight_tensor: Optional[Tensor],
                found_inf: Optional[Tensor]) -> None:
    _validator().check_swag_(means, sq_means, srcs, weight_tensor, found_inf)


def _check_merge(outs: List[Tensor], *input_lists: List[Tensor]) -> None:
    _validator().check_merge_(outs, [t for x in input_lists for t in x], len(input_lists))


def _check_lerp_multi(*lists: List[Tensor], found_inf: Optional[Tensor] = None) -> None:
    """lists = K average lists then the source list."""
    _validator().check_lerp_multi_([t for x in lists[:-1] for t in x], lists[-1], len(lists) - 1, found_inf)


def _check_any_nonfinite(tensors: List[Tensor]) -> None:
    _validator().check_any_nonfinite(tensors)


def _check_sq_norm(tensors: List[Tensor], scale: List[Tensor]) -> None:
    _validator().check_sq_norm(tensors, scale)


def _check_sam_ascent(params: List[Tensor], grads: List[Tensor], saved: List[Tensor], scale: Tensor,
                      found_inf: Optional[Tensor]) -> None:
    _validator().check_sam_ascent_(params, grads, saved, scale, found_inf)


def ema_(avg: TensorList, src: TensorList, decay: float, *, found_inf: Optional[Tensor] = None) -> None:
    """Exponential moving average, in place: ``avg = decay * avg + (1 - decay) * src``.

    Computed as ``lerp(avg, src, 1 - decay)``, exactly like ``torch._foreach_lerp_``,
    in float32 (float64 for float64 averages), rounding once at the store. ``src``
    may have any floating dtype. If ``found_inf`` (a one-element device tensor) is
    non-zero, nothing changes; it is read on the device, never synchronised.
    """
    avgs, srcs = _as_list("ema_", "avg", avg), _as_list("ema_", "src", src)
    decay = _check_decay("ema_", decay)
    _check_flag_type("ema_", found_inf)
    if not avgs:  # nothing to do, but unequal lengths are still an error
        return _prefixed("ema_", "check_lerp_", avgs, srcs, None, found_inf)
    _run("ema_", "lerp_", [avgs, srcs], [avg, src], _check_lerp,
         (1.0 - decay, None, found_inf), (None, found_inf))


def swa_(avg: TensorList, src: TensorList, n_averaged: Union[int, Tensor], *,
         found_inf: Optional[Tensor] = None) -> None:
    """Equal-weight running mean, in place: ``avg += (src - avg) / (n_averaged + 1)``.

    ``n_averaged`` counts the models already in ``avg``: 0 makes this a copy. It may
    be an int or a one-element tensor on the average's device (no host sync).
    Computed as ``lerp(avg, src, 1 / (n_averaged + 1))``.
    """
    avgs, srcs = _as_list("swa_", "avg", avg), _as_list("swa_", "src", src)
    weight, weight_tensor = _swa_weight("swa_", n_averaged, avgs[0].device if avgs else None)
    _check_flag_type("swa_", found_inf)
    if not avgs:
        return _prefixed("swa_", "check_lerp_", avgs, srcs, None, found_inf)
    _run("swa_", "lerp_", [avgs, srcs], [avg, src], _check_lerp,
         (weight, weight_tensor, found_inf), (weight_tensor, found_inf))


def swag_(mean: TensorList, sq_mean: TensorList, src: TensorList, n_averaged: Union[int, Tensor], *,
          found_inf: Optional[Tensor] = None) -> None:
    """SWAG's first and second moments in one pass over memory, in place.

    ``mean += (src - mean) / (n+1)`` and ``sq_mean += (src**2 - sq_mean) / (n+1)``,
    with ``n = n_averaged`` (an int or a one-element device tensor).
    """
    means = _as_list("swag_", "mean", mean)
    sq_means = _as_list("swag_", "sq_mean", sq_mean)
    srcs = _as_list("swag_", "src", src)
    weight, weight_tensor = _swa_weight("swag_", n_averaged, means[0].device if means else None)
    _check_flag_type("swag_", found_inf)
    if not means:
        return _prefixed("swag_", "check_swag_", means, sq_means, srcs, None, found_inf)
    _run("swag_", "swag_", [means, sq_means, srcs], [mean, sq_mean, src], _check_swag,
         (weight, weight_tensor, found_inf), (weight_tensor, found_inf))


def _check_weights(op: str, weights: Sequence[float], count: int, kind: str) -> List[float]:
    """``count`` finite numbers, one per ``kind`` list, as floats."""
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"{op}: got {len(weights)} weights for {count} {kind} lists")
    return [_check_number(op, f"weights[{k}]", w) for k, w in enumerate(weights)]


def _check_unit_weights(op: str, weights: List[float]) -> None:
    """EMA weights (a source's share, ``1 - decay``) lie in [0, 1]."""
    for k, w in enumerate(weights):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"{op}: weights[{k}] must be in [0, 1], got {w}")


def _k_lists(op: str, name: str, value: Sequence[TensorList], weights: Sequence[float], kind: str,
             paired: Tuple[str, List[Tensor]]) -> Tuple[List[List[Tensor]], List[float]]:
    """K tensor lists and their K weights: types, counts, finite numbers, and each list as long as
    ``paired`` (the list the K lists pair with by position, which their k-major flattening needs)."""
    if isinstance(value, (Tensor, FlatBuffer)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of K tensor lists (one per {kind})")
    if len(value) == 0:
        raise ValueError(f"{op}: {name} is empty; give at least one {kind}")
    lists = [_as_list(op, f"{name}[{k}]", x) for k, x in enumerate(value)]
    weights = _check_weights(op, weights, len(lists), "input" if kind == "model" else "average")
    paired_name, paired_list = paired
    for k, xs in enumerate(lists):
        if len(xs) != len(paired_list):
            raise ValueError(f"{op}: {paired_name} has {len(paired_list)} tensors but {name}[{k}] has {len(xs)}")
    return lists, weights


def merge_(out: TensorList, inputs: Sequence[TensorList], weights: Union[Sequence[float], Tensor]) -> None:
    """K-way weighted merge, in place: ``out = sum_k weights[k] * inputs[k]``.

    ``inputs`` is a sequence of K tensor lists, each paired with ``out`` by position.
    ``out`` may be one of the inputs (the merge then runs in place). Accumulates in
    float32 (float64 for float64 outputs) and rounds once at the store. ``weights``
    are numbers or a CPU tensor (reading a device tensor would synchronise).
    """
    outs = _as_list("merge_", "out", out)
    if isinstance(weights, Tensor):
        if weights.device.type != "cpu":
            raise ValueError(f"merge_: weights must be numbers or a CPU tensor, got a tensor on {weights.device} "
                             "(reading it would synchronise with the host)")
        weights = weights.detach().reshape(-1).tolist()
    input_lists, weights = _k_lists("merge_", "inputs", inputs, weights, "model", ("out", outs))
    if not outs:
        return
    _run("merge_", "merge_", [outs, *input_lists], [out, *inputs], _check_merge, (weights,),
         pack=lambda lists: (lists[0], lists[1:]))


def ema_multi_(avgs: Sequence[TensorList], src: TensorList, weights: Sequence[float], *,
               found_inf: Optional[Tensor] = None) -> None:
    """K exponential moving averages of one source in one pass: ``avgs[k] = lerp(avgs[k], src, weights[k])``.

    ``weights[k]`` in [0, 1] is the source's weight in profile k (``1 - decay_k``); each profile
    computes exactly as ``ema_(avgs[k], src, 1 - weights[k])`` would, but the source is read once:
    (source + 8K) bytes per element for K fp32 profiles instead of K x (source + 8). ``avgs`` is
    K tensor lists (or K FlatBuffers of the source's layout), each paired with ``src`` by position.
    If ``found_inf`` is non-zero nothing changes.
    """
    _ema_multi("ema_multi_", avgs, src, weights, found_inf)


def _ema_multi(op: str, avgs: Sequence[TensorList], src: TensorList, weights: Sequence[float],
               found_inf: Optional[Tensor]) -> None:
    """:func:`ema_multi_`, its errors prefixed with ``op``."""
    srcs = _as_list(op, "src", src)
    avg_lists, weights = _k_lists(op, "avgs", avgs, weights, "profile", ("src", srcs))
    _check_unit_weights(op, weights)
    _check_flag_type(op, found_inf)
    if not srcs:
        return
    _run(op, "lerp_multi_", [*avg_lists, srcs], [*avgs, src],
         lambda *lists: _check_lerp_multi(*lists, found_inf=found_inf), (weights, found_inf),
         pack=lambda lists: (lists[:-1], lists[-1]))


def any_nonfinite(tensors: TensorList) -> Tensor:
    """A 0-dim float32 tensor on the tensors' device: 1.0 if any element is NaN or Inf, else 0.0.

    Tensors that are not floating point cannot hold NaN/Inf and are left out (they are
    not checked either), so a whole ``state_dict`` can be passed. Never synchronises with
    the host; pass the result as ``found_inf`` to skip a step.
    """
    tensor_list = _as_list("any_nonfinite", "tensors", tensors)
    if isinstance(tensors, FlatBuffer) and tensor_list:  # one storage per dtype: whole groups at once
        if all(s.is_floating_point() for s in tensors.storages):
            return _run("any_nonfinite", "any_nonfinite", [tensor_list], [tensors],
                        _check_any_nonfinite)
    floating = [t for t in tensor_list if t.is_floating_point()]
    if not floating:
        device = tensor_list[0].device if tensor_list else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)
    return _run("any_nonfinite", "any_nonfinite", [floating], [floating], _check_any_nonfinite)


class BoundLists:
    """Tensor lists bound once, for ops repeated every step with no per-tensor cost in Python.

    ``BoundLists(avg, src)`` serves :meth:`ema_` and :meth:`swa_`; ``BoundLists(mean, sq_mean, src)``
    serves :meth:`swag_`; ``BoundLists(avg_1, ..., avg_K, src)`` serves :meth:`step_multi_` (K EMA
    profiles of one source); :meth:`any_nonfinite` checks one of the lists. With the compiled backend
    (cpp on CPU, cuda on CUDA) the lists cross into C++ once, at the first call, and each call then
    costs a few microseconds whatever the number of tensors; other backends run the plain ops.
    Every call is validated exactly like the plain op (csrc/validate.h), with the same errors. The
    binding holds the tensors themselves: after replacing one (``module.weight = ...``), bind again.
    Not for use inside ``torch.compile``d code (use the plain ops there).
    """

    def __init__(self, *lists: TensorList):
        if not lists:
            raise ValueError("BoundLists: give at least one tensor list")
        storages = _flat_storages(lists)
        self._lists = storages if storages is not None else [
            list(_as_list("BoundLists", f"lists[{k}]", x)) for k, x in enumerate(lists)]
        for k, xs in enumerate(self._lists[1:], 1):
            if len(xs) != len(self._lists[0]):
                raise ValueError(f"BoundLists: lists[0] has {len(self._lists[0])} tensors but lists[{k}] has {len(xs)}")
        self._has_floating = [any(t.is_floating_point() for t in xs) for xs in self._lists]
        self._handles: dict = {}  # (backend, list indices, floating only) -> torch.classes.swm_fused.BoundLists

    def __len__(self) -> int:
        return len(self._lists[0])

    def _compiled(self, indices: Tuple[int, ...], floating_only: bool = False):
        """The C++ binding of lists ``indices`` when the compiled backend runs them, else None."""
        backend = dispatch.select(self._lists[0][0].device)
        if backend.name not in ("cpp", "cuda"):
            return None
        key = (backend.name, indices, floating_only)
        handle = self._handles.get(key)
        if handle is None:
            lists = [[t for t in self._lists[k] if t.is_floating_point() or not floating_only] for k in indices]
            handle = self._handles[key] = torch.classes.swm_fused.BoundLists([t for x in lists for t in x], len(lists))
        return handle

    @staticmethod
    def _call(op: str, handle: Any, method: str, *args: Any) -> Any:
        try:
            with torch.no_grad():
                return getattr(handle, method)(*args)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{op}: {exc}") from None

    def _need(self, op: str, count: int) -> None:
        if len(self._lists) != count:
            raise ValueError(f"{op}: needs {count} bound lists, this binding has {len(self._lists)}")

    def ema_(self, decay: float, *, found_inf: Optional[Tensor] = None) -> None:
        """:func:`ema_` on the bound (avg, src)."""
        self._need("ema_", 2)
        decay = _check_decay("ema_", decay)
        _check_flag_type("ema_", found_inf)
        handle = self._compiled((0, 1)) if len(self) else None
        if handle is None:
            return ema_(*self._lists, decay, found_inf=found_inf)
        self._call("ema_", handle, "lerp_", 1.0 - decay, None, found_inf)

    def swa_(self, n_averaged: Union[int, Tensor], *, found_inf: Optional[Tensor] = None) -> None:
        """:func:`swa_` on the bound (avg, src)."""
        self._need("swa_", 2)
        handle = self._compiled((0, 1)) if len(self) else None
        if handle is None:
            return swa_(*self._lists, n_averaged, found_inf=found_inf)
        weight, weight_tensor = _swa_weight("swa_", n_averaged, self._lists[0][0].device)
        _check_flag_type("swa_", found_inf)
        self._call("swa_", handle, "lerp_", weight, weight_tensor, found_inf)

    def swag_(self, n_averaged: Union[int, Tensor], *, found_inf: Optional[Tensor] = None) -> None:
        """:func:`swag_` on the bound (mean, sq_mean, src)."""
        self._need("swag_", 3)
        handle = self._compiled((0, 1, 2)) if len(self) else None
        if handle is None:
            return swag_(*self._lists, n_averaged, found_inf=found_inf)
        weight, weight_tensor = _swa_weight("swag_", n_averaged, self._lists[0][0].device)
        _check_flag_type("swag_", found_inf)
        self._call("swag_", handle, "swag_", weight, weight_tensor, found_inf)

    def step_(self, counts: Tensor, *, decay: Optional[float] = None, skip_nonfinite: bool = True) -> Optional[Tensor]:
        """One whole averaging step over the bound (avg, src), in one call into C++ with the compiled backend.

        With ``skip_nonfinite``, ``flag = any_nonfinite(src)`` first (every src tensor must be floating);
        then :meth:`ema_` with ``decay``, or :meth:`swa_` with ``n_averaged = counts[0]`` when ``decay``
        is None, skipped when flagged; then ``counts += 1 - flag`` (every element of the int64 device
        tensor ``counts``). Returns the flag (None without the check). Never synchronises.
        """
        self._need("step_", 2)
        if decay is not None:
            decay = _check_decay("step_", decay)
        handle = self._compiled((0, 1)) if len(self) else None
        if handle is None:
            flag = any_nonfinite(self._lists[1]) if skip_nonfinite else None
            if decay is not None:
                ema_(*self._lists, decay, found_inf=flag)
            else:
                swa_(*self._lists, counts[0], found_inf=flag)
            if flag is None:
                counts.add_(1)
            else:
                counts.sub_(flag.to(counts.dtype)).add_(1)
            return flag
        return self._call("step_", handle, "step_", 0.0 if decay is None else 1.0 - decay, decay is None,
                          skip_nonfinite, counts)

    def step_multi_(self, weights: Sequence[float], counts: Sequence[Tensor] = (), *, skip_nonfinite: bool = True,
                    skipped: Sequence[Tensor] = ()) -> Optional[Tensor]:
        """One step of K EMA profiles over the bound (avg_1, ..., avg_K, src), in one call into C++ with the
        compiled backend (K + 1 bound lists, the source last).

        With ``skip_nonfinite``, ``flag = any_nonfinite(src)`` first (every src tensor must be floating);
        then :func:`ema_multi_` with ``weights`` (K numbers in [0, 1], each profile's source weight
        ``1 - decay_k``), skipped when flagged; then every tensor of ``counts`` += ``1 - flag`` and every
        tensor of ``skipped`` += ``flag`` (integer device tensors: the callers' counters; without the
        check, ``counts`` += 1). Returns the flag (None without the check). Never synchronises.
        """
        if len(self._lists) < 2:
            raise ValueError(f"step_multi_: needs K >= 1 average lists and the source, this binding has "
                             f"{len(self._lists)} list")
        weights = _check_weights("step_multi_", weights, len(self._lists) - 1, "average")
        _check_unit_weights("step_multi_", weights)
        counts, skipped = list(counts), list(skipped)
        for name, tensors in (("counts", counts), ("skipped", skipped)):
            if not all(isinstance(t, Tensor) for t in tensors):
                raise TypeError(f"step_multi_: {name} must be a sequence of Tensors")
        handle = self._compiled(tuple(range(len(self._lists)))) if len(self) else None
        if handle is None:  # Python backends (and empty lists): the plain ops, same results
            flag = any_nonfinite(self._lists[-1]) if skip_nonfinite else None
            _ema_multi("step_multi_", self._lists[:-1], self._lists[-1], weights, flag)
            if flag is None:
                for c in counts:
                    c.add_(1)
            else:
                skip = flag.to(torch.int64)
                for c in counts:
                    c.sub_(skip).add_(1)
                for s in skipped:
                    s.add_(skip)
            return flag
        return self._call("step_multi_", handle, "step_multi_", weights, skip_nonfinite, counts, skipped)

    def bind_step(self, counts: Tensor, *, swa: bool = False, skipped: Optional[Tensor] = None,
                  latest: Sequence[Tensor] = (), live: Sequence[Tensor] = (),
                  pin_sources: bool = False) -> Optional[int]:
        """Binds a whole :meth:`step_` once, counters included, for ``swm_fused._C.bound_step(key, weight, check)``.

        ``bound_step(key, 1 - decay, check)`` (with ``swa``: ``1 / (counts[0] + 1)``, the weight argument
        is ignored) does in one plain C call what ``step_(counts, decay=..., skip_nonfinite=check)``
        does, plus ``skipped += flag`` (``skipped``: a one-element int64 tensor on the counts' device)
        and ``latest[i] <- live[i]`` unless flagged (tensors kept as their latest value, e.g. integer
        buffers). It returns 0, or 1 without touching anything when the sources are not on the
        counts' device or, with ``pin_sources``, when a source storage gained or lost a reference
        since this binding (a flattened model's parameters moved out): check and bind again.
        Errors are those of :meth:`step_`, unprefixed. Binding again replaces the binding (same key).

        Returns the key, or None when the compiled backend does not run these lists now (empty lists,
        or another backend chosen): use :meth:`step_` then. The key is valid while this object lives;
        the backend is chosen here, so a caller that binds once must re-bind when the choice changes.
        """
        self._need("bind_step", 2)
        handle = self._compiled((0, 1)) if len(self) else None
        if handle is None:
            return None
        return self._call("bind_step", handle, "bind_step_", counts, skipped, bool(swa), list(latest), list(live),
                          bool(pin_sources))

    def any_nonfinite(self, index: int = -1) -> Tensor:
        """:func:`any_nonfinite` of bound list ``index`` (default: the last, the source)."""
        index = range(len(self._lists))[index]
        handle = self._compiled((index,), floating_only=True) if self._has_floating[index] else None
        if handle is None:
            return any_nonfinite(self._lists[index])
        return self._call("any_nonfinite", handle, "any_nonfinite", 0)


def sq_norm(tensors: TensorList, *, scale: Optional[TensorList] = None) -> Tensor:
    """The squared L2 norm of a whole list, as a 0-dim tensor on its device: ``sum_i sum((scale_i * t_i)**2)``.

    One multi-tensor reduction; never synchronises with the host. ``scale`` (optional) is a list
    paired with ``tensors`` by position (SAM's adaptive variant, ASAM, passes the weights: the norm
    of ``|w| * g``). Each square is computed in the tensor's compute type (float32, float64 for
    float64 tensors), the squares are summed in float64, and the total is rounded once to float32,
    the result's dtype (float64, unrounded, when any of ``tensors`` is float64). The summation order
    is the backend's, so backends agree to about one rounding of the result.
    """
    tensor_list = _as_list("sq_norm", "tensors", tensors)
    scale_list: List[Tensor] = [] if scale is None else _as_list("sq_norm", "scale", scale)
    if scale is not None and not scale_list and tensor_list:
        # The kernels read an empty scale list as "no scale"; an empty list given by the caller is a length error.
        raise ValueError(f"sq_norm: tensors has {len(tensor_list)} tensors but scale has 0")
    if not tensor_list:
        _prefixed("sq_norm", "check_sq_norm", tensor_list, scale_list)
        return torch.zeros((), dtype=torch.float32, device=torch.device("cpu"))
    args = [tensors] if scale is None else [tensors, scale]
    return _run("sq_norm", "sq_norm", [tensor_list, scale_list], args, _check_sq_norm,
                pack=lambda lists: (lists[0], lists[1] if len(lists) > 1 else []))  # no scale: an empty list


def sam_ascent_(params: TensorList, grads: TensorList, saved: TensorList, scale: Tensor, *,
                adaptive: bool = False, found_inf: Optional[Tensor] = None) -> None:
    """SAM's ascent in one pass, in place: ``saved = w`` and ``w = w + scale * (w*w if adaptive else 1) * g``.

    ``scale`` is a one-element tensor on the params' device (SAM: ``rho / (norm + 1e-12)``), read on
    the device. The arithmetic is davda54/sam's per-parameter code, ``e_w = ((w*w) * g) * scale``
    (``g * scale`` without ``adaptive``), then ``w + e_w``, each product and the sum rounded
    separately in the params' compute type (float32, float64 for float64 params); ``saved`` gets
    ``w`` exactly when its dtype is the params'. When ``found_inf`` is non-zero the params are left
    as they are, but ``saved`` is still written, so a restore from it stays exact.
    """
    params_list = _as_list("sam_ascent_", "params", params)
    grads_list = _as_list("sam_ascent_", "grads", grads)
    saved_list = _as_list("sam_ascent_", "saved", saved)
    if not isinstance(scale, Tensor):
        raise TypeError(f"sam_ascent_: scale must be a one-element Tensor, got {type(scale).__name__}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"sam_ascent_: adaptive must be a bool, got {type(adaptive).__name__}")
    _check_flag_type("sam_ascent_", found_inf)
    if not params_list:
        return _prefixed("sam_ascent_", "check_sam_ascent_", params_list, grads_list, saved_list, scale, found_inf)
    _run("sam_ascent_", "sam_ascent_", [params_list, grads_list, saved_list], [params, grads, saved],
         _check_sam_ascent, (scale, adaptive, found_inf), (scale, found_inf))



def _check_bool(op: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def _optional_list(op: str, name: str, value: Optional[TensorList], paired: Tuple[str, List[Tensor]]) -> List[Tensor]:
    """An optional list paired with another: [] for None. The kernels read an empty list as "not given", so an
    empty list given for a non-empty ``paired`` list is a length error here."""
    if value is None:
        return []
    tensors = _as_list(op, name, value)
    if not tensors and paired[1]:
        raise ValueError(f"{op}: {paired[0]} has {len(paired[1])} tensors but {name} has 0")
    return tensors


def ties_merge_(out: TensorList, inputs: Sequence[TensorList], weights: Sequence[float], *,
                base: Optional[TensorList] = None, thresholds: Optional[Tensor] = None,
                majority_sign: Optional[str] = "sum", normalize: bool = False, scale: float = 1.0,
                task_vectors: bool = False) -> None:
    """TIES-Merging in one pass over the K inputs: trim, elect a sign per element, sum the agreeing entries.

    ``inputs`` is K tensor lists (one per model), each paired with ``out`` by position; ``base`` (optional)
    is one more. Element by element, in float32 (float64 when any tensor of the position is float64):

    1. task vectors ``d_k = inputs[k] - base`` (``inputs[k]`` itself without a base or with ``task_vectors``);
    2. trim: with ``thresholds`` (a floating tensor of shape (K, N, 2) on the tensors' device: model k's
       band ``[lo, hi)`` for tensor i; ``hi = inf`` is no upper bound), ``x_k = w_k * d_k`` where
       ``lo <= |d_k| < hi`` (compared exactly), else 0; without thresholds every ``x_k = w_k * d_k``;
    3. elect: ``E = sum_k x_k`` (``majority_sign="sum"``) or ``sum_k sign(x_k)`` (``"count"``,
       ``sign(0) = 0``), added in order k; entry k is kept where ``x_k > 0`` if ``E >= 0``, else where
       ``x_k < 0``; ``majority_sign=None`` keeps every entry (a trimmed weighted sum, no election);
    4. ``M = sum_k [kept] x_k`` and ``D = sum_k [kept] w_k``; ``mixed = M / D`` (D = 0 read as 1) with
       ``normalize``, else ``M``;
    5. ``out = base + scale * mixed`` (``scale * mixed`` without a base), rounded once into out's dtype.

    Each operation is rounded in the compute dtype, weights and scale rounded to it once. ``out`` may be
    the base or one of the inputs. The thresholds are read on the device (no host sync); compute them
    outside, e.g. with ``torch.kthvalue`` of ``|d_k|``.
    """
    op = "ties_merge_"
    outs = _as_list(op, "out", out)
    input_lists, weights = _k_lists(op, "inputs", inputs, weights, "model", ("out", outs))
    base_list = _optional_list(op, "base", base, ("out", outs))
    if thresholds is not None and not isinstance(thresholds, Tensor):
        raise TypeError(f"{op}: thresholds must be a Tensor or None, got {type(thresholds).__name__}")
    if majority_sign is not None and not isinstance(majority_sign, str):
        raise TypeError(f"{op}: majority_sign must be 'sum', 'count' or None, got {type(majority_sign).__name__}")
    sign = "none" if majority_sign is None else majority_sign
    normalize = _check_bool(op, "normalize", normalize)
    task_vectors = _check_bool(op, "task_vectors", task_vectors)
    scale = _check_number(op, "scale", scale)
    k = len(input_lists)

    def check(*lists: List[Tensor]) -> None:
        _validator().check_ties_merge_(lists[0], [t for x in lists[1:k + 1] for t in x], k,
                                       lists[k + 1] if base_list else [], thresholds, sign)

    if not outs:
        return _prefixed(op, "check_ties_merge_", outs, [], k, base_list, thresholds, sign)
    lists = [outs, *input_lists] + ([base_list] if base_list else [])
    # Thresholds belong to views: FlatBuffer storages can stand in for the views only without them.
    args = ([out, *inputs] + ([base] if base_list else [])) if thresholds is None else lists
    _run(op, "ties_merge_", lists, args, check, (thresholds, sign, normalize, scale, task_vectors),
         pack=lambda ls: (ls[0], ls[1:k + 1], weights, ls[k + 1] if base_list else []))


def dare_drop_(deltas: TensorList, u: TensorList, keep_prob: Union[float, TensorList], *,
               rescale: bool = True) -> None:
    """DARE's drop and rescale in one pass, in place: ``delta <- delta / p`` where ``u < p``, else 0.

    ``u`` (uniform draws, any floating dtype) pairs with ``deltas`` by position; ``keep_prob`` is one
    probability in (0, 1] for every element, or a list of per-element probabilities paired with ``deltas``
    (DELLA). ``u < p`` is compared exactly; ``delta / p`` is computed in float64 and rounded once into the
    delta's dtype (through float32 into bfloat16/float16, as torch converts float64). With
    ``rescale=False`` kept entries are left as they are.
    """
    op = "dare_drop_"
    delta_list, u_list = _as_list(op, "deltas", deltas), _as_list(op, "u", u)
    p, prob_list = 1.0, []
    if isinstance(keep_prob, (Tensor, FlatBuffer, list, tuple)):
        prob_list = _optional_list(op, "keep_prob", keep_prob, ("deltas", delta_list))
    else:
        p = _check_number(op, "keep_prob", keep_prob)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"{op}: keep_prob must be in (0, 1], got {p}")
    rescale = _check_bool(op, "rescale", rescale)
    if not delta_list:
        return _prefixed(op, "check_dare_drop_", delta_list, u_list, prob_list)
    lists = [delta_list, u_list] + ([prob_list] if prob_list else [])
    args = [deltas, u] + ([keep_prob] if prob_list else [])
    _run(op, "dare_drop_", lists, args, lambda d, uu, pp=(): _validator().check_dare_drop_(d, uu, list(pp)),
         (p, rescale), pack=lambda ls: (ls[0], ls[1], ls[2] if len(ls) > 2 else []))
