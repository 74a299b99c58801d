"""The one case harness for every backend and device: random inputs for an op, the op run under a
backend on copies of them, and the comparison with the reference backend or with float64 math.

A case is a dict: ``op`` (ema_, swa_, swag_, merge_, ema_multi_), its tensors (``avg``/``src``/``sq``,
``out``/``inputs`` or ``avgs``/``src``), ``decay``, ``n``, ``weights``, and a ``layout`` under which the op sees views
of those tensors ("offset" views start one element in, so vectorised kernels take their scalar
path; "strided" and "transposed" views are not contiguous). Outputs of merges are poisoned (NaN)
before the run. ``rows()`` lists the (backend, device) pairs this machine can run.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import swm_fused
from swm_fused import dispatch, use_backend
from _helpers import BACKEND_TOLERANCES, FLOAT64_TOLERANCES, assert_close, assert_unchanged

OPS = ("ema_", "swa_", "swag_", "merge_", "ema_multi_")
WRITTEN = ("avg", "sq", "out")
CPU = torch.device("cpu")


def devices() -> List[torch.device]:
    return [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


class _ValidatedEmulatedKernels:
    """The emulated CUDA kernels (tests/cuda_emu: csrc/cuda compiled for the host, run on CPU
    tensors) behind the one validator, as every backend is: the check_* op, then the kernels."""

    def __init__(self, emulated):
        self._emu = emulated
        self._checks = torch.ops.swm_fused

    def lerp_(self, avgs, srcs, weight, weight_tensor, found_inf):
        self._checks.check_lerp_(avgs, srcs, weight_tensor, found_inf)
        self._emu.lerp_(avgs, srcs, weight, weight_tensor, found_inf)

    def lerp_multi_(self, avgs, srcs, weights, found_inf):
        self._checks.check_lerp_multi_([t for x in avgs for t in x], srcs, len(weights), found_inf)
        self._emu.lerp_multi_(avgs, srcs, weights, found_inf)

    def swag_(self, means, sq_means, srcs, weight, weight_tensor, found_inf):
        self._checks.check_swag_(means, sq_means, srcs, weight_tensor, found_inf)
        self._emu.swag_(means, sq_means, srcs, weight, weight_tensor, found_inf)

    def merge_(self, outs, inputs, weights):
        self._checks.check_merge_(outs, [t for x in inputs for t in x], len(weights))
        self._emu.merge_(outs, inputs, weights)

    def any_nonfinite(self, tensors):
        self._checks.check_any_nonfinite(tensors)
        return self._emu.any_nonfinite(tensors)

    def sq_norm(self, tensors, scale):
        self._checks.check_sq_norm(tensors, scale)
        return self._emu.sq_norm(tensors, scale)

    def sam_ascent_(self, params, grads, saved, scale, adaptive, found_inf):
        self._checks.check_sam_ascent_(params, grads, saved, scale, found_inf)
        self._emu.sam_ascent_(params, grads, saved, scale, adaptive, found_inf)

    def ties_merge_(self, outs, inputs, weights, base, thresholds, majority_sign, normalize, scale, task_vectors):
        self._checks.check_ties_merge_(outs, [t for x in inputs for t in x], len(weights), base, thresholds,
                                       majority_sign)
        self._emu.ties_merge_(outs, inputs, weights, base, thresholds, majority_sign, normalize, scale, task_vectors)

    def dare_drop_(self, deltas, u, keep_prob, p, rescale):
        self._checks.check_dare_drop_(deltas, u, keep_prob)
        self._emu.dare_drop_(deltas, u, keep_prob, p, rescale)


def _emulated_cuda_row() -> List[Tuple[str, torch.device]]:
    """("cuda_emu", cpu) when the emulated CUDA build is available: the CUDA kernels then run the
    shared cases too, through the public ops (registered with dispatch for the tests' use only)."""
    if "cuda_emu" in dispatch._probe_cache:
        return [("cuda_emu", CPU)] if dispatch._probe_cache["cuda_emu"][0] is not None else []
    try:
        from cuda_emu import backend as emu_backend
        emulated = emu_backend.load()
        reason = emulated.unavailable_reason()
    except Exception as exc:  # noqa: BLE001  (reported by tests/test_cuda_emulated.py)
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        dispatch._probe_cache["cuda_emu"] = (None, reason)
        return []
    kernels = _ValidatedEmulatedKernels(emulated)
    dispatch._probe_cache["cuda_emu"] = (dispatch.Backend("cuda_emu", kernels, frozenset({"cpu"})), "")
    return [("cuda_emu", CPU)]


def rows(emulated: bool = False) -> List[Tuple[str, torch.device]]:
    """(backend, device) for every available backend on every device it runs on here; with
    ``emulated``, plus the CUDA kernels emulated on the CPU (tests/cuda_emu)."""
    found = [(name, device) for device in devices() for name in swm_fused.available_backends()
             if dispatch.get_backend(name).supports(device)]
    return found + (_emulated_cuda_row() if emulated else [])


def row_id(row: Tuple[str, torch.device]) -> str:
    return f"{row[0]}-{row[1].type}"


# Layouts: (written base shape, written view, read base shape, read view) for a view of n elements.
Layout = Tuple[Callable[[int], tuple], Callable[[Tensor], Tensor], Callable[[int], tuple], Callable[[Tensor], Tensor]]
LAYOUTS: Dict[str, Layout] = {
    "contiguous": (lambda n: (n,), lambda t: t, lambda n: (n,), lambda t: t),
    "offset": (lambda n: (n + 1,), lambda t: t[1:], lambda n: (n + 1,), lambda t: t[1:]),
    "strided": (lambda n: (n, 2), lambda t: t[:, 1], lambda n: (n, 3), lambda t: t[:, 2]),
    "transposed": (lambda n: (3, n), lambda t: t.t(), lambda n: (3, n), lambda t: t.t()),
}


def random_tensor(shape, dtype: torch.dtype, device: torch.device = CPU, scale: float = 1.0) -> Tensor:
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def make_case(op: str, shapes: Sequence, avg_dtypes: Sequence[torch.dtype], src_dtypes: Sequence[torch.dtype], *,
              k: int = 3, device: torch.device = CPU, layout: str = "contiguous", alias: Optional[int] = None) -> Dict:
    """Random inputs for ``op``; dtypes cycle over the positions of the list.

    ``shapes`` are tensor shapes, or ints (sizes of the layout's 1-D views). For merges,
    ``alias=j`` makes ``out`` the very same tensors as ``inputs[j]``; one weight is always negative.
    ``ema_multi_`` gets K average lists (profile k with the dtypes rotated by k) and K weights in [0, 1].
    """
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    shapes = [s if isinstance(s, tuple) else int(s) for s in shapes]
    if layout != "contiguous" and not all(isinstance(s, int) for s in shapes):
        raise ValueError("non-contiguous layouts take int sizes")
    w_shapes = [s if isinstance(s, tuple) else w_shape(s) for s in shapes]
    r_shapes = [s if isinstance(s, tuple) else r_shape(s) for s in shapes]
    avg_dt = [avg_dtypes[i % len(avg_dtypes)] for i in range(len(shapes))]
    src_dt = [src_dtypes[i % len(src_dtypes)] for i in range(len(shapes))]
    weights = [random.uniform(-0.5, 1.5) for _ in range(k)]
    weights[-1] = -abs(weights[-1]) - 0.1  # task arithmetic puts a negative weight on the base
    case: Dict = {"op": op, "layout": layout, "alias": alias, "weights": weights,
                  "decay": random.uniform(0.5, 0.999), "n": random.randrange(0, 9)}
    if op == "ema_multi_":
        case["avgs"] = [[random_tensor(s, avg_dt[(i + j) % len(avg_dt)], device) for i, s in enumerate(w_shapes)]
                        for j in range(k)]
        case["src"] = [random_tensor(s, d, device, scale=2.0) for s, d in zip(r_shapes, src_dt)]
        case["weights"] = [random.choice([0.0, 1.0, random.random(), random.uniform(0.5, 1.0)]) for _ in range(k)]
        return case
    if op == "merge_":
        case["inputs"] = [[random_tensor(s, d, device) for s, d in zip(r_shapes, src_dt)] for _ in range(k)]
        if alias is None:
            case["out"] = [torch.full(s, float("nan"), dtype=d, device=device) for s, d in zip(w_shapes, avg_dt)]
        else:
            case["out"] = [random_tensor(s, d, device) for s, d in zip(w_shapes, avg_dt)]
            case["inputs"][alias] = case["out"]
        return case
    case["avg"] = [random_tensor(s, d, device) for s, d in zip(w_shapes, avg_dt)]
    case["src"] = [random_tensor(s, d, device, scale=2.0) for s, d in zip(r_shapes, src_dt)]
    if op == "swag_":
        case["sq"] = [(a.double() ** 2 + torch.rand_like(a, dtype=torch.float64)).to(a.dtype) for a in case["avg"]]
    return case


def copy_case(case: Dict) -> Dict:
    c = dict(case)
    for key in ("avg", "src", "sq", "out"):
        if key in case:
            c[key] = [t.clone() for t in case[key]]
    if "inputs" in case:
        c["inputs"] = [[t.clone() for t in x] for x in case["inputs"]]
        if case["alias"] is not None:
            c["inputs"][case["alias"]] = c["out"]
    if "avgs" in case:
        c["avgs"] = [[t.clone() for t in x] for x in case["avgs"]]
    return c


def views(c: Dict) -> Dict[str, List]:
    """The layout's views of a case's tensors: what the op is given."""
    _, w_view, _, r_view = LAYOUTS[c["layout"]]
    v = {key: [(w_view if key in WRITTEN else r_view)(t) for t in c[key]]
         for key in ("avg", "src", "sq", "out") if key in c}
    if "inputs" in c:  # inputs[alias] gets out's very view objects: a true in-place merge
        v["inputs"] = [v["out"] if k == c["alias"] else [r_view(t) for t in x] for k, x in enumerate(c["inputs"])]
    if "avgs" in c:
        v["avgs"] = [[w_view(t) for t in x] for x in c["avgs"]]
    return v


def apply(c: Dict, v: Dict, found_inf: Optional[Tensor] = None, n_as_tensor: bool = False) -> None:
    """The case's op on the argument lists ``v`` (lists, views or FlatBuffers)."""
    op = c["op"]
    n = torch.tensor(c["n"], device=_device(c)) if n_as_tensor else c["n"]
    if op == "ema_":
        swm_fused.ema_(v["avg"], v["src"], c["decay"], found_inf=found_inf)
    elif op == "swa_":
        swm_fused.swa_(v["avg"], v["src"], n, found_inf=found_inf)
    elif op == "swag_":
        swm_fused.swag_(v["avg"], v["sq"], v["src"], n, found_inf=found_inf)
    elif op == "ema_multi_":
        swm_fused.ema_multi_(v["avgs"], v["src"], c["weights"], found_inf=found_inf)
    else:
        swm_fused.merge_(v["out"], v["inputs"], c["weights"])


def _device(c: Dict) -> torch.device:
    return (c.get("avg") or c.get("out") or c["src"])[0].device


def run(case: Dict, backend: str, found_inf: Optional[Tensor] = None, n_as_tensor: bool = False) -> Dict:
    """Apply the case's op under ``backend`` to views of a copy of its tensors; return the copy."""
    c = copy_case(case)
    with use_backend(backend):
        apply(c, views(c), found_inf, n_as_tensor)
    return c


def written(c: Dict) -> List[Tensor]:
    """The tensors an op writes (whole bases, so gaps between views count too), in order."""
    return [t for key in WRITTEN for t in c.get(key, [])] + [t for x in c.get("avgs", []) for t in x]


def read_only(c: Dict) -> List[Tensor]:
    if "inputs" in c:
        return [t for k, x in enumerate(c["inputs"]) if k != c["alias"] for t in x]
    return list(c["src"])


def float64_oracle(case: Dict) -> List[Tensor]:
    """The op's math in float64 on a contiguous case's inputs (sources as stored)."""
    op = case["op"]
    if op == "merge_":
        return [sum(w * x[i].double() for w, x in zip(case["weights"], case["inputs"]))
                for i in range(len(case["out"]))]
    if op == "ema_multi_":
        return [a.double() + w * (s.double() - a.double())
                for w, x in zip(case["weights"], case["avgs"]) for a, s in zip(x, case["src"])]
    w = 1.0 - case["decay"] if op == "ema_" else 1.0 / (case["n"] + 1)
    new = [a.double() + w * (s.double() - a.double()) for a, s in zip(case["avg"], case["src"])]
    if op == "swag_":
        new += [q.double() + w * (s.double() ** 2 - q.double()) for q, s in zip(case["sq"], case["src"])]
    return new


def check_float64(case: Dict, backend: str) -> None:
    for i, (g, e) in enumerate(zip(written(run(case, backend)), float64_oracle(case))):
        assert_close(g, e, *FLOAT64_TOLERANCES[g.dtype], what=f"{backend} {case['op']} tensor {i} ({g.dtype})")


def compare_to_reference(case: Dict, backend: str, found_inf: Optional[Tensor] = None, n_as_tensor: bool = False,
                         exact: bool = False) -> None:
    """``backend`` writes what the reference writes (within BACKEND_TOLERANCES, or bit for bit with
    ``exact``) and leaves read-only inputs bit-identical."""
    expected = run(case, "reference", found_inf, n_as_tensor)
    actual = run(case, backend, found_inf, n_as_tensor)
    for i, (a, e) in enumerate(zip(written(actual), written(expected))):
        assert a.dtype == e.dtype
        atol, rtol = (0.0, 0.0) if exact else BACKEND_TOLERANCES[e.dtype]
        assert_close(a, e, atol, rtol, what=f"{backend} {case['op']} written[{i}] ({a.dtype}, {tuple(a.shape)})")
    assert_unchanged(read_only(case), read_only(actual), f"{backend} {case['op']} read-only inputs")
