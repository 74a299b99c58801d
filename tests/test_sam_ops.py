"""The SAM ops (sq_norm, sam_ascent_) and the restore (merge_ with one input and weight 1.0) on every
backend and device, in the style of the shared case harness (tests/_cases.py): the reference against
float64 math, every other backend against the reference, odd sizes, mixed dtypes, many tensors,
views, found_inf, FlatBuffers, and bad input (a clear error, the same on every backend, nothing written)."""
from __future__ import annotations

import itertools
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
from _helpers import (BACKEND_TOLERANCES, FLOAT64_TOLERANCES, FLOAT_DTYPES, assert_close, assert_unchanged, bits,
                      clones, cpu_backends)

ROWS = rows()
OTHER_ROWS = [r for r in ROWS if r[0] != "reference"]
BACKENDS = cpu_backends()
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
# Every backend squares in the compute type and adds in float64, in its own order, then rounds once to
# float32 (float64 results when a tensor is float64); the float64 oracle differs by the rounding of each square.
NORM_RTOL = 2e-6


def _dtype_id(pair) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


# ---------------------------------------------------------------------------------------------
# Cases: dicts like tests/_cases.py's, with the op's tensors and a layout.

def make_norm_case(shapes, dtypes, scale_dtypes=None, *, device=torch.device("cpu"), layout="contiguous") -> Dict:
    _, _, r_shape, _ = LAYOUTS[layout]
    shapes = [s if isinstance(s, tuple) else r_shape(s) for s in shapes]
    case = {"op": "sq_norm", "layout": layout,
            "tensors": [random_tensor(s, dtypes[i % len(dtypes)], device, scale=3.0) for i, s in enumerate(shapes)]}
    if scale_dtypes is not None:
        case["scale"] = [random_tensor(s, scale_dtypes[i % len(scale_dtypes)], device) for i, s in enumerate(shapes)]
    return case


def make_ascent_case(shapes, param_dtypes, grad_dtypes, saved_dtypes=None, *, device=torch.device("cpu"),
                     layout="contiguous", adaptive=False, scale_dtype=torch.float32) -> Dict:
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    w_shapes = [s if isinstance(s, tuple) else w_shape(s) for s in shapes]
    r_shapes = [s if isinstance(s, tuple) else r_shape(s) for s in shapes]
    saved_dtypes = saved_dtypes or param_dtypes
    pick = lambda dts, i: dts[i % len(dts)]  # noqa: E731
    return {
        "op": "sam_ascent_", "layout": layout, "adaptive": adaptive,
        "params": [random_tensor(s, pick(param_dtypes, i), device) for i, s in enumerate(w_shapes)],
        "grads": [random_tensor(s, pick(grad_dtypes, i), device, scale=2.0) for i, s in enumerate(r_shapes)],
        "saved": [torch.full(s, float("nan"), dtype=pick(saved_dtypes, i), device=device)
                  for i, s in enumerate(w_shapes)],
        "scale": torch.tensor(random.uniform(-0.7, 1.3), dtype=torch.float64, device=device).to(scale_dtype),
    }


def copy_case(case: Dict) -> Dict:
    c = dict(case)
    for key in ("tensors", "scale_list", "params", "grads", "saved"):
        if key in case:
            c[key] = clones(case[key])
    if "scale" in case and isinstance(case["scale"], list):
        c["scale"] = clones(case["scale"])
    return c


def views(c: Dict) -> Dict:
    _, w_view, _, r_view = LAYOUTS[c["layout"]]
    if c["op"] == "sq_norm":
        v = {"tensors": [r_view(t) for t in c["tensors"]]}
        if "scale" in c:
            v["scale"] = [r_view(t) for t in c["scale"]]
        return v
    return {"params": [w_view(t) for t in c["params"]], "grads": [r_view(t) for t in c["grads"]],
            "saved": [w_view(t) for t in c["saved"]]}


def apply(c: Dict, v: Dict, found_inf: Optional[Tensor] = None):
    if c["op"] == "sq_norm":
        return swm_fused.sq_norm(v["tensors"], scale=v.get("scale"))
    swm_fused.sam_ascent_(v["params"], v["grads"], v["saved"], c["scale"], adaptive=c["adaptive"],
                          found_inf=found_inf)
    return None


def run(case: Dict, backend: str, found_inf: Optional[Tensor] = None):
    """(the op's result, the copy of the case it ran on) under ``backend``."""
    c = copy_case(case)
    with use_backend(backend):
        result = apply(c, views(c), found_inf)
    return result, c


def float64_norm(case: Dict) -> float:
    v = views(case)
    scale = v.get("scale")
    return float(sum(((scale[i].double() if scale else 1.0) * t.double()).pow(2).sum()
                     for i, t in enumerate(v["tensors"])))


def float64_ascent(case: Dict) -> List[Tensor]:
    s = case["scale"].double()
    out = []
    for w, g in zip(case["params"], case["grads"]):
        w, g = w.double(), g.double()
        out.append(w + ((w * w) * g if case["adaptive"] else g) * s)
    return out


def check_norm_against_reference(case: Dict, backend: str) -> None:
    expected, _ = run(case, "reference")
    actual, after = run(case, backend)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in case["tensors"]) else torch.float32
    assert actual.dtype == expected.dtype == dtype and actual.dim() == 0 and actual.device == expected.device
    assert_close(actual, expected, 0.0, NORM_RTOL, what=f"{backend} sq_norm")
    assert_unchanged(case["tensors"] + case.get("scale", []), after["tensors"] + after.get("scale", []),
                     f"{backend} sq_norm inputs")


def check_ascent_against_reference(case: Dict, backend: str, found_inf: Optional[Tensor] = None) -> None:
    """Written params and saved as the reference writes them, bit for bit (the same roundings in the same
    order, no fma) for float32/float64 params, within one ulp of the stored format otherwise; grads unchanged."""
    _, expected = run(case, "reference", found_inf)
    _, actual = run(case, backend, found_inf)
    for key in ("params", "saved"):
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert a.dtype == e.dtype
            atol, rtol = BACKEND_TOLERANCES[e.dtype]
            assert_close(a, e, atol, rtol, what=f"{backend} sam_ascent_ {key}[{i}] ({a.dtype})")
    assert_unchanged(case["grads"], actual["grads"], f"{backend} sam_ascent_ grads")


# ---------------------------------------------------------------------------------------------
# The reference against float64 math.

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("device", [r[1] for r in ROWS if r[0] == "reference"], ids=str)
def test_reference_sq_norm_matches_float64(device, pair):
    plain = make_norm_case([(4097,), (7, 3), (1,)], [pair[0]], device=device)
    scaled = make_norm_case([(4097,), (7, 3), (1,)], [pair[0]], [pair[1]], device=device)
    for case in (plain, scaled):
        got, _ = run(case, "reference")
        assert got.item() == pytest.approx(float64_norm(case), rel=NORM_RTOL)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("device", [r[1] for r in ROWS if r[0] == "reference"], ids=str)
def test_reference_sam_ascent_matches_float64(device, pair, adaptive):
    case = make_ascent_case([(4097,), (7, 3), (1,)], [pair[0]], [pair[1]], device=device, adaptive=adaptive)
    _, after = run(case, "reference")
    for i, (got, want) in enumerate(zip(after["params"], float64_ascent(case))):
        atol, rtol = FLOAT64_TOLERANCES[got.dtype]
        assert_close(got, want, atol * 4, rtol, what=f"reference sam_ascent_ params[{i}] ({got.dtype})")
    for i, (s, w) in enumerate(zip(after["saved"], case["params"])):
        assert torch.equal(bits(s), bits(w)), f"saved[{i}] is not an exact copy of params[{i}]"


# ---------------------------------------------------------------------------------------------
# Every backend against the reference.

@pytest.mark.parametrize("size", [0, 1, 7, 4097])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_sq_norm_backend_matches_reference(row, pair, size):
    backend, device = row
    check_norm_against_reference(make_norm_case([(size,), (size, 2), (3,)], [pair[0]], device=device), backend)
    check_norm_against_reference(make_norm_case([(size,), (size, 2), (3,)], [pair[0]], [pair[1]], device=device),
                                 backend)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("size", [0, 1, 7, 4097])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_sam_ascent_backend_matches_reference(row, pair, size, adaptive):
    backend, device = row
    case = make_ascent_case([(size,), (size, 2)], [pair[0]], [pair[1]], device=device, adaptive=adaptive)
    check_ascent_against_reference(case, backend)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_sam_ascent_fp32_is_bit_for_bit_with_the_reference(row, adaptive):
    """float32 and float64 params: the same products and sum in the same order, no fma: 0 ulps."""
    backend, device = row
    case = make_ascent_case([(4097,), (33, 7), (1,)], [torch.float32, torch.float64], [torch.float32],
                            device=device, adaptive=adaptive)
    _, expected = run(case, "reference")
    _, actual = run(case, backend)
    for a, e in zip(actual["params"] + actual["saved"], expected["params"] + expected["saved"]):
        assert torch.equal(bits(a), bits(e))


@pytest.mark.parametrize("saved_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_saved_of_another_dtype_is_the_converted_params(row, saved_dtype):
    backend, device = row
    case = make_ascent_case([(4097,), (5,)], list(FLOAT_DTYPES), [torch.bfloat16], [saved_dtype], device=device)
    check_ascent_against_reference(case, backend)


@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_large_tensor(row):
    backend, device = row
    check_norm_against_reference(make_norm_case([(2**20 + 3,)], [torch.bfloat16], [torch.float32], device=device),
                                 backend)
    check_ascent_against_reference(make_ascent_case([(2**20 + 3,)], [torch.float32], [torch.bfloat16], device=device,
                                                    adaptive=True), backend)


@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_many_small_tensors_with_mixed_dtypes(row):
    backend, device = row
    shapes = [(int(s),) for s in torch.randint(1, 64, (5000,))]
    check_norm_against_reference(make_norm_case(shapes, FLOAT_DTYPES, FLOAT_DTYPES[::-1] + FLOAT_DTYPES[:1],
                                                 device=device), backend)
    check_ascent_against_reference(make_ascent_case(shapes, FLOAT_DTYPES, FLOAT_DTYPES[::-1] + FLOAT_DTYPES[:1],
                                                    FLOAT_DTYPES[1:], device=device, adaptive=True), backend)


@pytest.mark.parametrize("layout", ["offset", "strided", "transposed"])
@pytest.mark.parametrize("op", ["sq_norm", "sam_ascent_"])
@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_misaligned_and_non_contiguous_views(row, op, layout):
    """Views one element into their storage, strided and transposed views, every dtype in one list;
    the gaps between the views stay untouched."""
    backend, device = row
    sizes = [0, 1, 7, 4097, 33, 16385]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    if op == "sq_norm":
        check_norm_against_reference(make_norm_case(sizes, dtypes, dtypes[::-1], device=device, layout=layout),
                                     backend)
    else:
        case = make_ascent_case(sizes, dtypes, [torch.bfloat16, torch.float32, torch.float16], device=device,
                                layout=layout, adaptive=True)
        check_ascent_against_reference(case, backend)


def test_float8_grads_are_read_exactly():
    case = make_ascent_case([(300,), (7,)], [torch.float32, torch.bfloat16], [torch.float8_e4m3fn])
    for backend in BACKENDS:
        if backend != "reference":
            check_ascent_against_reference(case, backend)
            check_norm_against_reference({"op": "sq_norm", "layout": "contiguous", "tensors": case["grads"]}, backend)


@pytest.mark.parametrize("flag", [1.0, float("inf"), float("nan")], ids=["one", "inf", "nan"])
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_found_inf_keeps_the_params_and_still_saves_them(row, flag):
    backend, device = row
    case = make_ascent_case([(4097,), (7,)], [torch.float32, torch.bfloat16, torch.float64], [torch.float16],
                            device=device, adaptive=True)
    case["grads"][0][100] = float("inf")  # the pass a scaler flags is typically non-finite
    _, skipped = run(case, backend, found_inf=torch.tensor(flag, device=device))
    assert_unchanged(case["params"], skipped["params"], f"{backend} flagged params")
    assert_unchanged(case["params"], skipped["saved"], f"{backend} flagged saved")
    _, applied = run(case, backend, found_inf=torch.zeros((1,), device=device, dtype=torch.bool))
    _, plain = run(case, backend)
    for a, p in zip(applied["params"] + applied["saved"], plain["params"] + plain["saved"]):
        assert torch.equal(bits(a), bits(p))


@pytest.mark.parametrize("scale_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("row", OTHER_ROWS, ids=row_id)
def test_scale_of_any_floating_dtype(row, scale_dtype):
    backend, device = row
    check_ascent_against_reference(make_ascent_case([(77,)], [torch.float32, torch.float64], [torch.float32],
                                                    device=device, scale_dtype=scale_dtype), backend)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_sq_norm_of_nonfinite_is_nonfinite_and_of_nothing_is_zero(row):
    backend, device = row
    tensors = [random_tensor((n,), d, device) for n, d in zip((4097, 7, 0), FLOAT_DTYPES)]
    with use_backend(backend):
        assert swm_fused.sq_norm(tensors).isfinite().item()
        tensors[1][3] = float("inf")
        assert swm_fused.sq_norm(tensors).item() == float("inf")
        tensors[0][-1] = float("nan")
        assert swm_fused.sq_norm(tensors).isnan().item()
        empty = swm_fused.sq_norm([torch.empty(0, device=device)])
    assert empty.item() == 0.0 and empty.dtype == torch.float32 and empty.device == device
    assert swm_fused.sq_norm([]).item() == 0.0


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_sq_norm_repeats_bit_for_bit(row):
    """Fixed summation orders: the same inputs give the same bits, on any thread count."""
    backend, device = row
    tensors = [random_tensor((n,), torch.float32, device) for n in (300_001, 17, 65_536)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with use_backend(backend):
                results.append(swm_fused.sq_norm(tensors))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(bits(r), bits(results[0])) for r in results)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_single_tensor_stands_for_a_list(row):
    backend, device = row
    case = make_ascent_case([(33, 5)], [torch.float32], [torch.float16], device=device, adaptive=True)
    _, expected = run(case, backend)
    c = copy_case(case)
    with use_backend(backend):
        swm_fused.sam_ascent_(c["params"][0], c["grads"][0], c["saved"][0], c["scale"], adaptive=True)
        norm = swm_fused.sq_norm(c["grads"][0], scale=c["params"][0])
        norm_list = swm_fused.sq_norm(c["grads"], scale=c["params"])
    assert torch.equal(bits(c["params"][0]), bits(expected["params"][0]))
    assert torch.equal(bits(norm), bits(norm_list))


@pytest.mark.parametrize("op", ["sq_norm", "sam_ascent_"])
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_flatbuffers_run_once_per_storage_and_match_lists(row, op):
    backend, device = row
    shapes = [(31, 7), (4097,), (1,), (3, 3, 3)]
    kernels = dispatch.get_backend(backend).kernels
    if op == "sq_norm":
        case = make_norm_case(shapes, [torch.float32], [torch.bfloat16], device=device)
        expected, _ = run(case, backend)
        flat_t, flat_s = FlatBuffer.from_tensors(case["tensors"]), FlatBuffer.from_tensors(case["scale"])
        with use_backend(backend), mock.patch.object(kernels, op, wraps=getattr(kernels, op)) as spy:
            got = swm_fused.sq_norm(flat_t, scale=flat_s)
            got_plain = swm_fused.sq_norm(flat_t)
        assert_close(got, expected, 0.0, NORM_RTOL, what=f"{backend} flat sq_norm")
        plain, _ = run({k: v for k, v in case.items() if k != "scale"}, backend)
        assert_close(got_plain, plain, 0.0, NORM_RTOL, what=f"{backend} flat sq_norm without scale")
    else:
        case = make_ascent_case(shapes, [torch.float32], [torch.bfloat16], device=device, adaptive=True)
        _, expected = run(case, backend)
        flat = {k: FlatBuffer.from_tensors(case[k]) for k in ("params", "grads", "saved")}
        with use_backend(backend), mock.patch.object(kernels, op, wraps=getattr(kernels, op)) as spy:
            swm_fused.sam_ascent_(flat["params"], flat["grads"], flat["saved"], case["scale"], adaptive=True)
        for key in ("params", "saved"):
            for g, e in zip(flat[key].views, expected[key]):
                assert torch.equal(bits(g), bits(e))
    first_list = spy.call_args.args[0]
    assert len(first_list) == 1 and first_list[0].dim() == 1, "a flat op must see one storage, not the views"


# ---------------------------------------------------------------------------------------------
# The restore: merge_(params, [saved], [1.0]) is an exact copy when the dtypes match.

def _special_values(dtype: torch.dtype) -> Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.smallest_normal / 8, info.max, -info.max,
              float("inf"), float("-inf"), 1.0, -3.5]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_restore_with_merge_is_an_exact_copy(row, dtype):
    """Subnormals, signed zeros, the largest values and infinities included: 1.0 * x is x in every
    compute type, and the store rounds nothing when the dtypes match."""
    backend, device = row
    saved = [torch.cat([_special_values(dtype), random_tensor((4097,), dtype)]).to(device),
             random_tensor((7, 3), dtype, device), random_tensor((1,), dtype, device)]
    saved[0][5] = torch.finfo(dtype).tiny / 2 if dtype != torch.float64 else 5e-324
    params = [torch.full_like(s, float("nan")) for s in saved]
    with use_backend(backend):
        swm_fused.merge_(params, [saved], [1.0])
    for p, s in zip(params, saved):
        assert torch.equal(bits(p), bits(s))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, raised before anything is written, the same on every backend.

def _bad_calls():
    f32, i64 = torch.float32, torch.int64
    a = lambda *s, d=f32: random_tensor(s, d)  # noqa: E731
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    one = torch.tensor(0.1)
    asc = swm_fused.sam_ascent_
    return {
        "norm_not_a_tensor": (lambda p, g, s: swm_fused.sq_norm([g[0], "x"]), TypeError,
                              "sq_norm: tensors[1] is a str, not a Tensor"),
        "norm_int": (lambda p, g, s: swm_fused.sq_norm([g[0], torch.ones(3, dtype=i64)]), TypeError,
                     "sq_norm: tensors[1] has dtype torch.int64; sources must be floating point"),
        "norm_scale_lengths": (lambda p, g, s: swm_fused.sq_norm(g, scale=p[:1]), ValueError,
                               "sq_norm: tensors has 2 tensors but scale has 1"),
        "norm_scale_empty": (lambda p, g, s: swm_fused.sq_norm(g, scale=[]), ValueError,
                             "sq_norm: tensors has 2 tensors but scale has 0"),
        "norm_scale_shape": (lambda p, g, s: swm_fused.sq_norm(g, scale=[p[0], a(4)]), ValueError,
                             "sq_norm: shape mismatch at index 1: tensors[1] has shape (3,) but scale[1] has shape (4,)"),
        "norm_scale_device": (lambda p, g, s: swm_fused.sq_norm(g, scale=[p[0], meta(3)]), ValueError,
                              "sq_norm: scale[1] is on meta but tensors[0] is on cpu"),
        "ascent_lengths": (lambda p, g, s: asc(p, g[:1], s, one), ValueError,
                           "sam_ascent_: params has 2 tensors but grads has 1"),
        "ascent_saved_lengths": (lambda p, g, s: asc(p, g, s[:1], one), ValueError,
                                 "sam_ascent_: params has 2 tensors but saved has 1"),
        "ascent_shape": (lambda p, g, s: asc(p, [g[0], a(3, 1)], s, one), ValueError,
                         "sam_ascent_: shape mismatch at index 1: params[1] has shape (3,) but grads[1] has shape (3, 1)"),
        "ascent_saved_shape": (lambda p, g, s: asc(p, g, [s[0], a(2)], one), ValueError,
                               "sam_ascent_: shape mismatch at index 1: params[1] has shape (3,) but saved[1] has shape (2,)"),
        "ascent_int_param": (lambda p, g, s: asc([p[0], a(3, d=i64)], g, s, one), TypeError,
                             "sam_ascent_: params[1] has dtype torch.int64; averages and outputs must be"),
        "ascent_int_grad": (lambda p, g, s: asc(p, [g[0], a(3, d=i64)], s, one), TypeError,
                            "sam_ascent_: grads[1] has dtype torch.int64; sources must be floating point"),
        "ascent_float8_saved": (lambda p, g, s: asc(p, g, [s[0], a(3).to(torch.float8_e4m3fn)], one), TypeError,
                                "sam_ascent_: saved[1] has dtype torch.float8_e4m3fn;"),
        "ascent_meta_grad": (lambda p, g, s: asc(p, [meta(4, 5), g[1]], s, one), ValueError,
                             "sam_ascent_: grads[0] is on meta but params[0] is on cpu"),
        "ascent_scale_shape": (lambda p, g, s: asc(p, g, s, torch.ones(2)), ValueError,
                               "sam_ascent_: scale must hold exactly one element, got shape (2,)"),
        "ascent_scale_device": (lambda p, g, s: asc(p, g, s, meta()), ValueError,
                                "sam_ascent_: scale is on meta but the tensors are on cpu"),
        "ascent_scale_int": (lambda p, g, s: asc(p, g, s, torch.tensor(1)), TypeError,
                             "sam_ascent_: scale has dtype torch.int64; it must be floating point"),
        "ascent_scale_number": (lambda p, g, s: asc(p, g, s, 0.1), TypeError,
                                "sam_ascent_: scale must be a one-element Tensor, got float"),
        "ascent_adaptive_type": (lambda p, g, s: asc(p, g, s, one, adaptive=1), TypeError,
                                 "sam_ascent_: adaptive must be a bool, got int"),
        "ascent_found_inf_shape": (lambda p, g, s: asc(p, g, s, one, found_inf=torch.zeros(2)), ValueError,
                                   "sam_ascent_: found_inf must hold exactly one element"),
        "ascent_found_inf_type": (lambda p, g, s: asc(p, g, s, one, found_inf=1.0), TypeError,
                                  "sam_ascent_: found_inf must be a Tensor or None, got float"),
        # Several rules broken at once: the flags first, then list lengths, then list by list.
        "flags_before_lists": (lambda p, g, s: asc(p, g[:1], s, torch.ones(2)), ValueError,
                               "sam_ascent_: scale must hold exactly one element"),
        "lengths_before_dtype": (lambda p, g, s: asc([p[0], a(3, d=i64)], g, s[:1], one), ValueError,
                                 "sam_ascent_: params has 2 tensors but saved has 1"),
        "list_by_list": (lambda p, g, s: asc([p[0], a(3, d=i64)], [meta(4, 5), g[1]], s, one), TypeError,
                         "sam_ascent_: params[1] has dtype torch.int64"),
    }


def _bad_input_data():
    p = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.bfloat16)]
    g = [random_tensor((4, 5), torch.float16), random_tensor((3,), torch.float32)]
    s = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.bfloat16)]
    return p, g, s


@pytest.mark.parametrize("name", list(_bad_calls()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clearly_and_writes_nothing(backend, name):
    call, error, text = _bad_calls()[name]
    p, g, s = _bad_input_data()
    before = clones(p + g + s)
    with use_backend(backend), pytest.raises(error, match=re.escape(text)) as raised:
        call(p, g, s)
    assert_unchanged(before, p + g + s, f"{backend} {name}")
    with use_backend("reference"), pytest.raises(error) as expected:
        call(*(clones(t) for t in (p, g, s)))
    assert str(raised.value) == str(expected.value)


def test_empty_lists_are_a_no_op_and_unequal_lengths_still_raise():
    swm_fused.sam_ascent_([], [], [], torch.tensor(1.0))
    assert swm_fused.sq_norm([], scale=[]).item() == 0.0
    with pytest.raises(ValueError, match="sam_ascent_: params has 0 tensors but grads has 1"):
        swm_fused.sam_ascent_([], [torch.ones(1)], [], torch.tensor(1.0))
    with pytest.raises(ValueError, match="sq_norm: tensors has 0 tensors but scale has 1"):
        swm_fused.sq_norm([], scale=[torch.ones(1)])


# ---------------------------------------------------------------------------------------------
# The compiled ops as torch.library ops.

needs_cpp = pytest.mark.skipif(bool(dispatch.backend_status()["cpp"]), reason="cpp backend unavailable")
SHAPES = [(3, 5), (7,), (), (0,), (33, 2)]


def _mixed(offset: int) -> List[Tensor]:
    return [random_tensor(s, FLOAT_DTYPES[(i + offset) % 4]) for i, s in enumerate(SHAPES)]


@needs_cpp
@pytest.mark.parametrize("op", ["sq_norm", "sam_ascent_"])
def test_validator_sits_in_front_of_the_kernels_and_has_a_check_op(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::{op}", "BackendSelect")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::check_{op}", "CompositeImplicitAutograd")


@needs_cpp
@pytest.mark.parametrize("scaled", [False, True])
def test_opcheck_sq_norm(scaled):
    torch.library.opcheck(torch.ops.swm_fused.sq_norm.default, (_mixed(0), _mixed(1) if scaled else []))


@needs_cpp
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("flag", [None, 0.0, 1.0])
def test_opcheck_sam_ascent(adaptive, flag):
    found_inf = None if flag is None else torch.tensor(flag)
    saved = [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in _mixed(0)]
    torch.library.opcheck(torch.ops.swm_fused.sam_ascent_.default,
                          (_mixed(0), _mixed(2), saved, torch.tensor(0.05), adaptive, found_inf))


@needs_cpp
def test_direct_call_with_a_meta_tensor_is_refused_before_writing():
    params, grads = _mixed(0), _mixed(1)
    before = clones(params)
    with pytest.raises(ValueError, match=re.escape("grads[4] is on meta but params[0] is on cpu")):
        torch.ops.swm_fused.sam_ascent_(params, grads[:4] + [torch.empty(33, 2, device="meta")],
                                        clones(params), torch.tensor(0.1), False, None)
    assert_unchanged(before, params, "direct sam_ascent_")


@pytest.mark.parametrize("backend", [None] + [b for b in BACKENDS if b != "cpp"])
def test_public_ops_compile_fullgraph(backend, monkeypatch):
    """sq_norm and sam_ascent_ trace with fullgraph=True (fake kernels, opaque Triton ops, plain torch)."""
    if backend is not None:
        monkeypatch.setenv(dispatch.ENV_VAR, backend)

    def step(params, grads, saved):
        norm = swm_fused.sq_norm(grads, scale=params).sqrt()
        swm_fused.sam_ascent_(params, grads, saved, 0.05 / (norm + 1e-12), adaptive=True)
        return norm

    params = [random_tensor((33,), torch.float32), random_tensor((4, 4), torch.bfloat16)]
    grads = [random_tensor((33,), torch.float32), random_tensor((4, 4), torch.float32)]
    eager_p, eager_s = clones(params), [torch.empty_like(p) for p in params]
    comp_p, comp_s = clones(params), [torch.empty_like(p) for p in params]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(comp_p, grads, comp_s), step(eager_p, grads, eager_s))
    for a, b in zip(comp_p + comp_s, eager_p + eager_s):
        assert torch.equal(bits(a), bits(b))
