"""The sparsifying-merge ops (ties_merge_, dare_drop_) on every backend and device, in the style of the shared
case harness (tests/_cases.py): the reference against float64 math, every other backend against the reference
bit for bit (0 ulps: the same roundings in the same order), including the CUDA kernels emulated on the CPU; odd
sizes, every dtype pair, K = 1, 2, 3, 8 (and many more), outputs poisoned with NaN, views, aliasing, thresholds
that sit exactly on the data, non-finite entries, FlatBuffers, and bad input (a clear error, the same on every
backend, nothing written)."""
from __future__ import annotations

import itertools
import math
import random
import re
from typing import Dict, List, Optional
from unittest import mock

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused import FlatBuffer, dispatch, use_backend
from _cases import LAYOUTS, random_tensor, row_id, rows
from _helpers import FLOAT64_TOLERANCES, FLOAT_DTYPES, assert_close, assert_unchanged, bits, clones, cpu_backends

ROWS = rows()
KERNEL_ROWS = [r for r in rows(emulated=True) if r[0] != "reference"]
ALL_ROWS = ROWS + [r for r in KERNEL_ROWS if r not in ROWS]  # with the emulated CUDA kernels
BACKENDS = cpu_backends()
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
SIZES = [0, 1, 7, 4097]
MAJORITY = ["sum", "count", None]
FP32_EPS, FP64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def _dtype_id(pair) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


def _pick(dtypes, i: int) -> torch.dtype:
    return dtypes[i % len(dtypes)]


# ---------------------------------------------------------------------------------------------
# Cases: dicts of the op's tensors (whole bases; the op sees the layout's views of them) and arguments.

def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _task_vector(case: Dict, k: int, i: int, view=lambda t: t) -> Tensor:
    """|d_k| of view i as the op's compute dtype holds it (what the thresholds are compared with)."""
    x = view(case["inputs"][k][i])
    base = view(case["base"][i]) if case["base"] is not None else None
    ct = _compute_dtype(case["out"][i], *(xs[i] for xs in case["inputs"]), *([base] if base is not None else []))
    d = x.to(ct) if base is None or case["task_vectors"] else x.to(ct) - base.to(ct)
    return d.abs().reshape(-1)


def _bands(case: Dict, view) -> Tensor:
    """(K, N, 2): lo and hi taken from the data itself (so entries sit exactly on them, as kthvalue thresholds
    do), hi = inf for about half; float32 or float64 at random."""
    k_total, n = len(case["inputs"]), len(case["out"])
    bands = torch.empty((k_total, n, 2), dtype=torch.float64)
    for k in range(k_total):
        for i in range(n):
            magnitudes = _task_vector(case, k, i, view).double().sort().values
            if magnitudes.numel() == 0:
                bands[k, i] = torch.tensor([0.0, math.inf])
                continue
            at = lambda q: magnitudes[min(int(q * magnitudes.numel()), magnitudes.numel() - 1)]  # noqa: E731
            bands[k, i, 0] = at(random.uniform(0.0, 0.6))
            bands[k, i, 1] = math.inf if random.random() < 0.5 else at(random.uniform(0.8, 1.0))
    return bands.to(random.choice([torch.float32, torch.float64]))


def make_ties_case(sizes, out_dtypes, in_dtypes, *, k: int = 3, device=torch.device("cpu"), layout="contiguous",
                   base: bool = True, banded: bool = True, majority: Optional[str] = "sum", normalize: bool = True,
                   task_vectors: bool = False, alias=None, positive_weights: bool = False) -> Dict:
    """Random models near a base (a fine-tune each); input k's dtypes are ``in_dtypes`` rotated by k. ``alias``:
    "base" or an input index j makes ``out`` those very tensors."""
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    sizes = [s if isinstance(s, tuple) else int(s) for s in sizes]
    w_shapes = [s if isinstance(s, tuple) else w_shape(s) for s in sizes]
    r_shapes = [s if isinstance(s, tuple) else r_shape(s) for s in sizes]
    bases = [random_tensor(s, _pick(in_dtypes, i + 1), device) for i, s in enumerate(r_shapes)]
    inputs = [[(b.double() + random_tensor(s, torch.float64, device, scale=random.uniform(0.1, 1.0))).to(
        _pick(in_dtypes, i + j)) for i, (s, b) in enumerate(zip(r_shapes, bases))] for j in range(k)]
    weights = [random.uniform(0.3, 1.5) if positive_weights else random.choice([-1, 1]) * random.uniform(0.2, 1.5)
               for _ in range(k)]
    case = {"op": "ties_merge_", "layout": layout, "inputs": inputs, "base": bases if base else None,
            "weights": weights, "majority": majority, "normalize": normalize, "scale": random.uniform(0.5, 1.5),
            "task_vectors": task_vectors, "alias": alias, "thresholds": None}
    if alias is None:
        case["out"] = [torch.full(s, float("nan"), dtype=_pick(out_dtypes, i), device=device)
                       for i, s in enumerate(w_shapes)]
    else:  # out takes the aliased tensors' shapes: those of the read layout
        case["out"] = case["base"] if alias == "base" else inputs[alias]
    if banded:
        case["thresholds"] = _bands(case, LAYOUTS[layout][3]).to(device)
    return case


def make_dare_case(sizes, delta_dtypes, u_dtypes, *, device=torch.device("cpu"), layout="contiguous",
                   per_element: bool = False, rescale: bool = True, prob_dtypes=(torch.float64,)) -> Dict:
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    w_shapes = [s if isinstance(s, tuple) else w_shape(int(s)) for s in sizes]
    r_shapes = [s if isinstance(s, tuple) else r_shape(int(s)) for s in sizes]
    p = random.uniform(0.2, 0.9)
    return {"op": "dare_drop_", "layout": layout, "rescale": rescale,
            "deltas": [random_tensor(s, _pick(delta_dtypes, i), device, scale=3.0) for i, s in enumerate(w_shapes)],
            "u": [torch.rand(s, dtype=torch.float64, device=device).to(_pick(u_dtypes, i))
                  for i, s in enumerate(r_shapes)],
            "keep_prob": [(torch.rand(s, dtype=torch.float64, device=device) * 0.8 + 0.15).to(_pick(prob_dtypes, i))
                          for i, s in enumerate(r_shapes)] if per_element else p}


def copy_case(case: Dict) -> Dict:
    c = dict(case)
    for key in ("out", "base", "deltas", "u"):
        if isinstance(case.get(key), list):
            c[key] = clones(case[key])
    if isinstance(case.get("keep_prob"), list):
        c["keep_prob"] = clones(case["keep_prob"])
    if "inputs" in case:
        c["inputs"] = [clones(x) for x in case["inputs"]]
        if case["alias"] == "base":
            c["out"] = c["base"]
        elif case["alias"] is not None:
            c["out"] = c["inputs"][case["alias"]]
    return c


def views(c: Dict) -> Dict:
    _, w_view, _, r_view = LAYOUTS[c["layout"]]
    if c["op"] == "dare_drop_":
        probs = c["keep_prob"]
        return {"deltas": [w_view(t) for t in c["deltas"]], "u": [r_view(t) for t in c["u"]],
                "keep_prob": [r_view(t) for t in probs] if isinstance(probs, list) else probs}
    v = {"inputs": [[r_view(t) for t in x] for x in c["inputs"]],
         "base": [r_view(t) for t in c["base"]] if c["base"] is not None else None}
    if c["alias"] == "base":
        v["out"] = v["base"]
    elif c["alias"] is not None:
        v["out"] = v["inputs"][c["alias"]]
    else:
        v["out"] = [w_view(t) for t in c["out"]]
    return v


def apply(c: Dict, v: Dict) -> None:
    if c["op"] == "dare_drop_":
        swm_fused.dare_drop_(v["deltas"], v["u"], v["keep_prob"], rescale=c["rescale"])
    else:
        swm_fused.ties_merge_(v["out"], v["inputs"], c["weights"], base=v["base"], thresholds=c["thresholds"],
                              majority_sign=c["majority"], normalize=c["normalize"], scale=c["scale"],
                              task_vectors=c["task_vectors"])


def run(case: Dict, backend: str) -> Dict:
    c = copy_case(case)
    with use_backend(backend):
        apply(c, views(c))
    return c


def written(c: Dict) -> List[Tensor]:
    return list(c["deltas"] if c["op"] == "dare_drop_" else c["out"])


def read_only(c: Dict) -> List[Tensor]:
    if c["op"] == "dare_drop_":
        return c["u"] + (c["keep_prob"] if isinstance(c["keep_prob"], list) else [])
    lists = [x for j, x in enumerate(c["inputs"]) if j != c["alias"]]
    if c["base"] is not None and c["alias"] != "base":
        lists.append(c["base"])
    return [t for x in lists for t in x] + ([c["thresholds"]] if c["thresholds"] is not None else [])


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(actual: Tensor, expected: Tensor, what: str) -> None:
    """0 ulps, signed zeros included; a NaN only has to be a NaN (its payload differs between torch, CPUs
    and GPUs)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.detach().reshape(-1), expected.detach().reshape(-1)
    both_nan = a.isnan() & e.isnan()
    int_type = _INT_OF_SIZE[a.element_size()]
    differ = (a.contiguous().view(int_type) != e.contiguous().view(int_type)) & ~both_nan
    if bool(differ.any()):
        assert_close(actual, expected, 0.0, 0.0, what=what)
        raise AssertionError(f"{what}: {int(differ.sum())} elements with equal values and other bits (signed zeros)")


def compare_to_reference(case: Dict, backend: str) -> None:
    """``backend`` writes what the reference writes, bit for bit (whole bases: gaps between views count too),
    and leaves every read-only tensor bit-identical."""
    expected, actual = run(case, "reference"), run(case, backend)
    for i, (a, e) in enumerate(zip(written(actual), written(expected))):
        assert_same_bits(a, e, f"{backend} {case['op']} written[{i}] ({a.dtype}, {tuple(a.shape)})")
    assert_unchanged(read_only(case), read_only(actual), f"{backend} {case['op']} read-only inputs")


# ---------------------------------------------------------------------------------------------
# The reference against float64 math.

def float64_ties(case: Dict, i: int):
    """Position i in float64: (exact, exact with the other elected sign, where the election is ambiguous, the
    scale of the rounding errors). Which entries are in a band is decided on |d| as the compute dtype holds it."""
    x = [t[i].double() for t in case["inputs"]]
    b = case["base"][i].double() if case["base"] is not None else torch.zeros_like(x[0])
    d = torch.stack(x if case["base"] is None or case["task_vectors"] else [t - b for t in x]).reshape(len(x), -1)
    w = torch.tensor(case["weights"], dtype=torch.float64)[:, None]
    terms = w * d
    if case["thresholds"] is not None:
        magnitude = torch.stack([_task_vector(case, k, i).double() for k in range(len(x))])
        lo, hi = case["thresholds"][:, i, :1].double(), case["thresholds"][:, i, 1:].double()
        terms = torch.where((magnitude >= lo) & ((magnitude < hi) | (hi == math.inf)), terms, 0.0)
    votes = terms.sum(0) if case["majority"] == "sum" else terms.sign().sum(0)

    def mix(positive: Tensor) -> Tensor:
        kept = torch.where(positive, terms > 0, terms < 0) if case["majority"] else torch.ones_like(terms, dtype=bool)
        total = (terms * kept).sum(0)
        if case["normalize"]:
            divisor = (w * kept).sum(0)
            total = total / torch.where(divisor == 0, 1.0, divisor)
        return (b.reshape(-1) + case["scale"] * total).reshape(b.shape)

    ambiguous = (votes.abs() <= 16 * (len(x) + 2) * FP32_EPS * terms.abs().sum(0)) & (case["majority"] == "sum")
    error_scale = b.abs().reshape(-1) + case["scale"] * terms.abs().sum(0) / min(case["weights"])
    return mix(votes >= 0), mix(votes < 0), ambiguous.reshape(b.shape), error_scale.reshape(b.shape)


@pytest.mark.parametrize("majority", MAJORITY, ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
def test_reference_ties_merge_matches_float64(pair, majority):
    """Positive weights (so the kept weight sums stay away from 0); out within one rounding of its dtype plus
    compute-dtype arithmetic; where the elected sign is within rounding of 0, either sign's result."""
    for banded, normalize in ((True, True), (False, False)):
        case = make_ties_case([(4097,), (7, 3), (1,)], [pair[0]], [pair[1]], majority=majority, banded=banded,
                              normalize=normalize, positive_weights=True)
        got = run(case, "reference")["out"]
        for i, g in enumerate(got):
            exact, other, ambiguous, scale = float64_ties(case, i)
            compute_eps = FP64_EPS if torch.float64 in (pair[0], pair[1]) else FP32_EPS
            bound = torch.finfo(g.dtype).eps * exact.abs() + 8 * (len(case["inputs"]) + 4) * compute_eps * scale
            err = (g.double() - exact).abs()
            err = torch.where(ambiguous, torch.minimum(err, (g.double() - other).abs()), err)
            assert bool((err <= bound + torch.finfo(g.dtype).tiny).all()), \
                f"reference ties_merge_ out[{i}] ({g.dtype}): max error {err.max().item():.3g}"


@pytest.mark.parametrize("per_element", [False, True], ids=["scalar_p", "tensor_p"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
def test_reference_dare_drop_matches_float64(pair, per_element):
    for rescale in (True, False):
        case = make_dare_case([(4097,), (7, 3), (1,)], [pair[0]], [pair[1]], per_element=per_element,
                              rescale=rescale, prob_dtypes=[pair[1]])
        got = run(case, "reference")["deltas"]
        for i, g in enumerate(got):
            p = case["keep_prob"][i].double() if per_element else case["keep_prob"]
            d = case["deltas"][i].double()
            exact = torch.where(case["u"][i].double() < p, d / p if rescale else d, 0.0)
            assert_close(g, exact, *FLOAT64_TOLERANCES[g.dtype], what=f"reference dare_drop_ deltas[{i}]")
            if not rescale:  # kept entries are left exactly as they are
                assert torch.equal(g, exact.to(g.dtype))


# ---------------------------------------------------------------------------------------------
# Every backend against the reference, bit for bit.

@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_ties_merge_backend_matches_reference(row, pair, k):
    """Sizes 0, 1, 7, 4097 and a 2-d tensor in one list; the options cycle with the dtype pair."""
    backend, device = row
    index = DTYPE_PAIRS.index(pair)
    case = make_ties_case(SIZES + [(33, 2)], [pair[0]], [pair[1]], k=k, device=device,
                          majority=MAJORITY[index % 3], normalize=index % 2 == 0, banded=index % 4 != 3)
    compare_to_reference(case, backend)


@pytest.mark.parametrize("per_element", [False, True], ids=["scalar_p", "tensor_p"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_dare_drop_backend_matches_reference(row, pair, per_element):
    backend, device = row
    for rescale in (True, False):
        case = make_dare_case(SIZES + [(33, 2)], [pair[0]], [pair[1]], device=device, per_element=per_element,
                              rescale=rescale, prob_dtypes=[pair[1], torch.float64])
        compare_to_reference(case, backend)


@pytest.mark.parametrize("mode", ["models_and_base", "task_vectors_and_base", "no_base"])
@pytest.mark.parametrize("normalize", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("majority", MAJORITY, ids=str)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_ties_merge_options(row, majority, normalize, mode):
    """Every election, with and without normalize, for models + base, task vectors + base and task vectors
    alone; with and without bands; every dtype in one list."""
    backend, device = row
    for banded in (True, False):
        case = make_ties_case([4097, (3, 5), 1, 0], FLOAT_DTYPES, FLOAT_DTYPES[::-1], k=3, device=device,
                              majority=majority, normalize=normalize, banded=banded, base=mode != "no_base",
                              task_vectors=mode == "task_vectors_and_base")
        compare_to_reference(case, backend)


@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_large_tensor(row):
    backend, device = row
    compare_to_reference(make_ties_case([(2**20 + 3,)], [torch.float32], [torch.bfloat16], k=2, device=device),
                         backend)
    compare_to_reference(make_dare_case([(2**20 + 3,)], [torch.float32], [torch.float32], device=device,
                                        per_element=True), backend)


@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_many_small_tensors_with_mixed_dtypes(row):
    backend, device = row
    shapes = [(int(s),) for s in torch.randint(1, 64, (5000,))]
    compare_to_reference(make_ties_case(shapes, FLOAT_DTYPES, FLOAT_DTYPES[::-1], k=2, device=device), backend)
    compare_to_reference(make_dare_case(shapes, FLOAT_DTYPES, FLOAT_DTYPES[::-1], device=device, per_element=True,
                                        prob_dtypes=FLOAT_DTYPES), backend)


@pytest.mark.parametrize("layout", ["offset", "strided", "transposed"])
@pytest.mark.parametrize("op", ["ties_merge_", "dare_drop_"])
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_misaligned_and_non_contiguous_views(row, op, layout):
    """Views one element into their storage (vector kernels take their scalar path), strided and transposed
    views, every dtype in one list; the gaps between the views stay untouched."""
    backend, device = row
    sizes = [0, 1, 7, 4097, 33, 16385]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    if op == "ties_merge_":
        case = make_ties_case(sizes, dtypes, dtypes[::-1], k=3, device=device, layout=layout)
    else:
        case = make_dare_case(sizes, dtypes, dtypes[1:], device=device, layout=layout, per_element=True)
    compare_to_reference(case, backend)


@pytest.mark.parametrize("alias", ["base", 0, 2])
@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_ties_merge_in_place(row, layout, alias):
    """out is the base or one of the inputs (the very same tensors): every input is read before out is written."""
    backend, device = row
    case = make_ties_case([4097, 5, 1], FLOAT_DTYPES, [torch.float32, torch.bfloat16], k=3, device=device,
                          layout=layout, alias=alias)
    compare_to_reference(case, backend)


@pytest.mark.parametrize("k", [17, 40])
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_many_models(row, k):
    """K past any fixed table size: the CUDA kernels read the input pointers from a device table."""
    backend, device = row
    for majority in ("count", "sum"):
        case = make_ties_case([(4097,), (7,)], [torch.bfloat16, torch.float32], [torch.bfloat16], k=k, device=device,
                              majority=majority)
        compare_to_reference(case, backend)


@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_nonfinite_entries_match_the_reference(row):
    """NaN and infinite entries in the inputs and the base: the comparisons and selections treat them the same
    way on every backend (a NaN is in no band and never elected)."""
    backend, device = row
    for majority, banded in itertools.product(MAJORITY, (True, False)):
        case = make_ties_case([(513,), (7,)], [torch.float32, torch.bfloat16], [torch.float32], k=3, device=device,
                              majority=majority, banded=banded)
        for j, value in enumerate([float("nan"), float("inf"), -float("inf")]):
            case["inputs"][j][0][j::5] = value
            case["base"][0][(j + 3)::17] = value
        compare_to_reference(case, backend)
    drop = make_dare_case([(513,)], [torch.float32, torch.bfloat16], [torch.float32], device=device, per_element=True)
    drop["deltas"][0][::7] = float("inf")
    drop["u"][0][1::9] = float("nan")
    drop["keep_prob"][0][2::11] = float("nan")
    compare_to_reference(drop, backend)


@pytest.mark.parametrize("row", ALL_ROWS, ids=row_id)
def test_thresholds_are_compared_exactly(row):
    """A float32 task vector against float64 bounds one ulp of float64 away from it: lo just above |d| drops
    the entry, hi just above |d| keeps it (rounding the bounds to float32 would do the opposite); and u against
    a keep probability just above a float32 u keeps it."""
    backend, device = row
    d = torch.tensor([0.75, -1.5, 3.0, 0.1], dtype=torch.float32, device=device)
    out = torch.full((4,), float("nan"), device=device)
    bands = torch.tensor([[[0.75 + 2**-40, math.inf]], [[0.0, 1.5 + 2**-40]]], dtype=torch.float64, device=device)
    with use_backend(backend):
        swm_fused.ties_merge_(out, [d, d], [1.0, 1.0], thresholds=bands, majority_sign=None)
    # model 0 keeps |d| >= 0.75 + 2^-40: 1.5 and 3.0; model 1 keeps |d| < 1.5 + 2^-40: 0.75, 1.5, 0.1
    assert out.tolist() == [0.75, -3.0, 3.0, pytest.approx(0.1)]
    u32 = torch.tensor(0.3, dtype=torch.float32).item()  # the float32 nearest 0.3, above it
    u = torch.full((3,), u32, device=device)
    deltas = torch.ones(3, device=device)
    with use_backend(backend):
        swm_fused.dare_drop_(deltas, u, u32 + 2**-40, rescale=False)
    assert deltas.tolist() == [1.0, 1.0, 1.0]
    with use_backend(backend):
        swm_fused.dare_drop_(deltas, u, u32, rescale=False)
    assert deltas.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("row", ALL_ROWS, ids=row_id)
def test_count_election_is_exact_with_many_models(row):
    """151 models against 149, bf16 inputs: the count stays an exact integer, so + wins everywhere."""
    backend, device = row
    signs = [1.0] * 151 + [-1.0] * 149
    inputs = [torch.full((17,), s * (1 + 0.01 * i), dtype=torch.bfloat16, device=device) for i, s in enumerate(signs)]
    out = torch.empty(17, dtype=torch.float32, device=device)
    with use_backend(backend):
        swm_fused.ties_merge_(out, inputs, [1.0] * len(inputs), majority_sign="count")
    expected = math.fsum(float(x[0]) for x, s in zip(inputs, signs) if s > 0)
    assert_close(out, torch.full((17,), expected), 0.0, 1e-5, what=f"{backend} 300-model count election")


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_single_tensors_stand_for_lists(row):
    backend, device = row
    case = make_ties_case([(33, 5)], [torch.float32], [torch.float16], device=device)
    expected = run(case, backend)["out"]
    c = copy_case(case)
    with use_backend(backend):
        swm_fused.ties_merge_(c["out"][0], [x[0] for x in c["inputs"]], c["weights"], base=c["base"][0],
                              thresholds=c["thresholds"], majority_sign=c["majority"], normalize=c["normalize"],
                              scale=c["scale"])
    assert torch.equal(bits(c["out"][0]), bits(expected[0]))
    drop = make_dare_case([(33, 5)], [torch.float32], [torch.float32], device=device, per_element=True)
    expected = run(drop, backend)["deltas"]
    c = copy_case(drop)
    with use_backend(backend):
        swm_fused.dare_drop_(c["deltas"][0], c["u"][0], c["keep_prob"][0])
    assert torch.equal(bits(c["deltas"][0]), bits(expected[0]))


@pytest.mark.parametrize("op", ["ties_merge_", "dare_drop_"])
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_flatbuffers_run_once_per_storage_and_match_lists(row, op):
    """Without thresholds (they belong to views) every list of one layout hands over its storages."""
    backend, device = row
    shapes = [(31, 7), (4097,), (1,), (3, 3, 3)]
    kernels = dispatch.get_backend(backend).kernels
    if op == "ties_merge_":
        case = make_ties_case(shapes, [torch.float32], [torch.bfloat16], device=device, banded=False)
        expected = run(case, backend)["out"]
        flat = {"out": FlatBuffer.from_tensors(case["out"]), "base": FlatBuffer.from_tensors(case["base"]),
                "inputs": [FlatBuffer.from_tensors(x) for x in case["inputs"]]}
        with use_backend(backend), mock.patch.object(kernels, op, wraps=getattr(kernels, op)) as spy:
            swm_fused.ties_merge_(flat["out"], flat["inputs"], case["weights"], base=flat["base"],
                                  majority_sign=case["majority"], normalize=case["normalize"], scale=case["scale"])
        got = flat["out"].views
    else:
        case = make_dare_case(shapes, [torch.float32], [torch.float32], device=device, per_element=True)
        expected = run(case, backend)["deltas"]
        flat = {k: FlatBuffer.from_tensors(case[k]) for k in ("deltas", "u", "keep_prob")}
        with use_backend(backend), mock.patch.object(kernels, op, wraps=getattr(kernels, op)) as spy:
            swm_fused.dare_drop_(flat["deltas"], flat["u"], flat["keep_prob"])
        got = flat["deltas"].views
    for g, e in zip(got, expected):
        assert torch.equal(bits(g), bits(e))
    first_list = spy.call_args.args[0]
    assert len(first_list) == 1 and first_list[0].dim() == 1, "a flat op must see one storage, not the views"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, raised before anything is written, the same on every backend.

def _bad_calls():
    f32, i64 = torch.float32, torch.int64
    a = lambda *s, d=f32: random_tensor(s, d)  # noqa: E731
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    ties, drop = swm_fused.ties_merge_, swm_fused.dare_drop_
    bands = lambda *s, d=torch.float64: torch.zeros(s, dtype=d)  # noqa: E731
    return {
        "weights_count": (lambda o, x, b: ties(o, x, [1.0]), ValueError, "ties_merge_: got 1 weights for 2 input"),
        "weights_nan": (lambda o, x, b: ties(o, x, [1.0, float("nan")]), ValueError,
                        "ties_merge_: weights[1] must be finite, got nan"),
        "input_count": (lambda o, x, b: ties(o, [x[0], x[1][:1]], [1.0, 1.0]), ValueError,
                        "ties_merge_: out has 2 tensors but inputs[1] has 1"),
        "not_a_list": (lambda o, x, b: ties(o, x[0][0], [1.0]), TypeError,
                       "ties_merge_: inputs must be a list of K tensor lists"),
        "base_count": (lambda o, x, b: ties(o, x, [1.0, 1.0], base=b[:1]), ValueError,
                       "ties_merge_: out has 2 tensors but base has 1"),
        "base_empty": (lambda o, x, b: ties(o, x, [1.0, 1.0], base=[]), ValueError,
                       "ties_merge_: out has 2 tensors but base has 0"),
        "base_shape": (lambda o, x, b: ties(o, x, [1.0, 1.0], base=[b[0], a(4)]), ValueError,
                       "ties_merge_: shape mismatch at index 1: out[1] has shape (3,) but base[1] has shape (4,)"),
        "input_shape": (lambda o, x, b: ties(o, [x[0], [x[1][0], a(3, 1)]], [1.0, 1.0]), ValueError,
                        "ties_merge_: shape mismatch at index 1: out[1] has shape (3,) but inputs[1][1] has shape"),
        "int_out": (lambda o, x, b: ties([o[0], a(3, d=i64)], x, [1.0, 1.0]), TypeError,
                    "ties_merge_: out[1] has dtype torch.int64; averages and outputs must be"),
        "int_input": (lambda o, x, b: ties(o, [x[0], [x[1][0], a(3, d=i64)]], [1.0, 1.0]), TypeError,
                      "ties_merge_: inputs[1][1] has dtype torch.int64; sources must be floating point"),
        "meta_base": (lambda o, x, b: ties(o, x, [1.0, 1.0], base=[meta(4, 5), b[1]]), ValueError,
                      "ties_merge_: base[0] is on meta but out[0] is on cpu"),
        "bands_shape": (lambda o, x, b: ties(o, x, [1.0, 1.0], thresholds=bands(2, 2)), ValueError,
                        "ties_merge_: thresholds must have shape (K, N, 2) = (2, 2, 2) for K = 2 input lists of "
                        "N = 2 tensors, got (2, 2)"),
        "bands_int": (lambda o, x, b: ties(o, x, [1.0, 1.0], thresholds=bands(2, 2, 2, d=i64)), TypeError,
                      "ties_merge_: thresholds has dtype torch.int64; it must be floating point"),
        "bands_device": (lambda o, x, b: ties(o, x, [1.0, 1.0], thresholds=meta(2, 2, 2)), ValueError,
                         "ties_merge_: thresholds is on meta but the tensors are on cpu"),
        "bands_type": (lambda o, x, b: ties(o, x, [1.0, 1.0], thresholds=[[0.0, 1.0]]), TypeError,
                       "ties_merge_: thresholds must be a Tensor or None, got list"),
        "majority_value": (lambda o, x, b: ties(o, x, [1.0, 1.0], majority_sign="most"), ValueError,
                           "ties_merge_: majority_sign must be 'sum', 'count' or 'none', got 'most'"),
        "majority_type": (lambda o, x, b: ties(o, x, [1.0, 1.0], majority_sign=1), TypeError,
                          "ties_merge_: majority_sign must be 'sum', 'count' or None, got int"),
        "normalize_type": (lambda o, x, b: ties(o, x, [1.0, 1.0], normalize=1), TypeError,
                           "ties_merge_: normalize must be a bool, got int"),
        "scale_inf": (lambda o, x, b: ties(o, x, [1.0, 1.0], scale=float("inf")), ValueError,
                      "ties_merge_: scale must be finite, got inf"),
        "drop_lengths": (lambda o, x, b: drop(o, x[0][:1], 0.5), ValueError,
                         "dare_drop_: deltas has 2 tensors but u has 1"),
        "drop_shape": (lambda o, x, b: drop(o, [x[0][0], a(2)], 0.5), ValueError,
                       "dare_drop_: shape mismatch at index 1: deltas[1] has shape (3,) but u[1] has shape (2,)"),
        "drop_int_u": (lambda o, x, b: drop(o, [x[0][0], a(3, d=i64)], 0.5), TypeError,
                       "dare_drop_: u[1] has dtype torch.int64; sources must be floating point"),
        "drop_float8_delta": (lambda o, x, b: drop([o[0], a(3).to(torch.float8_e4m3fn)], x[0], 0.5), TypeError,
                              "dare_drop_: deltas[1] has dtype torch.float8_e4m3fn;"),
        "drop_p_zero": (lambda o, x, b: drop(o, x[0], 0.0), ValueError,
                        "dare_drop_: keep_prob must be in (0, 1], got 0.0"),
        "drop_p_bool": (lambda o, x, b: drop(o, x[0], True), TypeError, "dare_drop_: keep_prob must be a real number"),
        "drop_p_lengths": (lambda o, x, b: drop(o, x[0], x[1][:1]), ValueError,
                           "dare_drop_: deltas has 2 tensors but keep_prob has 1"),
        "drop_p_empty": (lambda o, x, b: drop(o, x[0], []), ValueError,
                         "dare_drop_: deltas has 2 tensors but keep_prob has 0"),
        "drop_p_meta": (lambda o, x, b: drop(o, x[0], [x[1][0], meta(3)]), ValueError,
                        "dare_drop_: keep_prob[1] is on meta but deltas[0] is on cpu"),
        "drop_rescale_type": (lambda o, x, b: drop(o, x[0], 0.5, rescale="density"), TypeError,
                              "dare_drop_: rescale must be a bool, got str"),
        # Several rules broken at once: the arguments first, then list lengths, then list by list.
        "list_counts_before_majority": (lambda o, x, b: ties(o, [x[0], x[1][:1]], [1.0, 1.0], majority_sign="most"),
                                  ValueError, "ties_merge_: out has 2 tensors but inputs[1] has 1"),
        "bands_before_dtypes": (lambda o, x, b: ties([o[0], a(3, d=i64)], x, [1.0, 1.0], thresholds=bands(1, 2, 2)),
                                ValueError, "ties_merge_: thresholds must have shape (K, N, 2)"),
        "list_by_list": (lambda o, x, b: ties([o[0], a(3, d=i64)], [[meta(4, 5), x[0][1]], x[1]], [1.0, 1.0]),
                         TypeError, "ties_merge_: out[1] has dtype torch.int64"),
    }


def _bad_input_data():
    out = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.bfloat16)]
    inputs = [[random_tensor((4, 5), torch.float16), random_tensor((3,), torch.float32)] for _ in range(2)]
    base = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.bfloat16)]
    return out, inputs, base


@pytest.mark.parametrize("name", list(_bad_calls()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clearly_and_writes_nothing(backend, name):
    call, error, text = _bad_calls()[name]
    out, inputs, base = _bad_input_data()
    before = clones(out + inputs[0] + inputs[1] + base)
    with use_backend(backend), pytest.raises(error, match=re.escape(text)) as raised:
        call(out, inputs, base)
    assert_unchanged(before, out + inputs[0] + inputs[1] + base, f"{backend} {name}")
    with use_backend("reference"), pytest.raises(error) as expected:
        o, x, b = _bad_input_data()
        call(o, x, b)
    assert str(raised.value) == str(expected.value)


def test_empty_lists_are_a_no_op_and_unequal_lengths_still_raise():
    swm_fused.ties_merge_([], [[], []], [1.0, 1.0], base=[])
    swm_fused.dare_drop_([], [], 0.5)
    swm_fused.dare_drop_([], [], [])
    with pytest.raises(ValueError, match="ties_merge_: out has 0 tensors but base has 1"):
        swm_fused.ties_merge_([], [[], []], [1.0, 1.0], base=[torch.ones(1)])
    with pytest.raises(ValueError, match="dare_drop_: deltas has 0 tensors but u has 1"):
        swm_fused.dare_drop_([], [torch.ones(1)], 0.5)


# ---------------------------------------------------------------------------------------------
# The compiled ops as torch.library ops.

# (tests/test_cpp_registration.py checks that both have CPU kernels behind the validator, and check_* ops.)
needs_cpp = pytest.mark.skipif(bool(dispatch.backend_status()["cpp"]), reason="cpp backend unavailable")
OPCHECK_SHAPES = [(3, 5), (7,), (), (0,), (33, 2)]  # a 0-d and an empty tensor among them


def _mixed(offset: int) -> List[Tensor]:
    """A list over OPCHECK_SHAPES whose dtypes cycle through every kernel dtype, starting at ``offset``."""
    return [random_tensor(s, FLOAT_DTYPES[(i + offset) % 4]) for i, s in enumerate(OPCHECK_SHAPES)]


@needs_cpp
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("majority", ["sum", "count", "none"])
@pytest.mark.parametrize("variant", ["base_bands", "task_vectors", "no_base"])
def test_opcheck_ties_merge(variant, majority, k):
    outs = [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in _mixed(0)]
    inputs = [t for j in range(k) for t in _mixed(j + 1)]  # k-major
    base = [] if variant == "no_base" else _mixed(2)
    bands = torch.rand(k, len(OPCHECK_SHAPES), 2, dtype=torch.float64) if variant == "base_bands" else None
    weights = torch.randn(k, dtype=torch.float64).tolist()
    torch.library.opcheck(torch.ops.swm_fused.ties_merge_.default,
                          (outs, inputs, weights, base, bands, majority, True, 0.7, variant == "task_vectors"))


@needs_cpp
@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_opcheck_dare_drop(rescale, per_element):
    probs = [torch.rand(s, dtype=torch.float64) * 0.5 + 0.3 for s in OPCHECK_SHAPES] if per_element else []
    u = [t.abs() / (1 + t.abs()) for t in _mixed(1)]  # in [0, 1)
    torch.library.opcheck(torch.ops.swm_fused.dare_drop_.default, (_mixed(0), u, probs, 0.4, rescale))


@needs_cpp
def test_direct_call_with_a_meta_tensor_is_refused_before_writing():
    outs, inputs = _mixed(0), _mixed(1)
    before = clones(outs)
    with pytest.raises(ValueError, match=re.escape("inputs[0][4] is on meta but out[0] is on cpu")):
        torch.ops.swm_fused.ties_merge_(outs, inputs[:4] + [torch.empty(33, 2, device="meta")], [1.0], [], None,
                                        "sum", False, 1.0, False)
    with pytest.raises(ValueError, match=re.escape("u[4] is on meta but deltas[0] is on cpu")):
        torch.ops.swm_fused.dare_drop_(outs, inputs[:4] + [torch.empty(33, 2, device="meta")], [], 0.5, True)
    assert_unchanged(before, outs, "direct ties_merge_/dare_drop_")


@pytest.mark.parametrize("backend", [None] + [b for b in BACKENDS if b != "cpp"])
def test_public_ops_compile_fullgraph(backend, monkeypatch):
    """ties_merge_ and dare_drop_ trace with fullgraph=True (fake kernels, opaque Triton ops, plain torch)."""
    if backend is not None:
        monkeypatch.setenv(dispatch.ENV_VAR, backend)

    def step(out, models, base, bands, deltas, u):
        swm_fused.dare_drop_(deltas, u, 0.4)
        swm_fused.ties_merge_(out, models, [0.6, 0.9], base=base, thresholds=bands, normalize=True, scale=0.8)
        swm_fused.ties_merge_(out, [deltas, deltas], [0.5, 0.5], base=base, task_vectors=True, majority_sign="count")

    base = [random_tensor((33,), torch.float32), random_tensor((4, 4), torch.bfloat16)]
    models = [[random_tensor((33,), torch.float32), random_tensor((4, 4), torch.bfloat16)] for _ in range(2)]
    bands = torch.rand(2, 2, 2, dtype=torch.float64) * torch.tensor([0.5, 3.0], dtype=torch.float64)
    u = [torch.rand(33), torch.rand(4, 4)]
    deltas = [random_tensor((33,), torch.float32), random_tensor((4, 4), torch.float32)]
    eager = ([torch.empty_like(b) for b in base], clones(deltas))
    compiled_args = ([torch.empty_like(b) for b in base], clones(deltas))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(compiled_args[0], models, base, bands, compiled_args[1], u)
    step(eager[0], models, base, bands, eager[1], u)
    for a, b in zip(compiled_args[0] + compiled_args[1], eager[0] + eager[1]):
        assert torch.equal(bits(a), bits(b))
