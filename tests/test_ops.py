"""The ops contract on every backend and device, through the one case harness (tests/_cases.py):
the reference against float64 math, every other backend against the reference, then bad input."""
from __future__ import annotations

import itertools
import random
import re
from typing import Dict, List
from unittest import mock

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused import FlatBuffer, dispatch, use_backend
from _cases import (OPS, apply, check_float64, compare_to_reference, copy_case, make_case, row_id, rows, run,
                    written)
from _helpers import (BACKEND_TOLERANCES, FLOAT_DTYPES, assert_close, assert_unchanged, bits, clones,
                      cpu_backends, random_tensor)

DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
ROWS = rows()  # (backend, device)
OTHER_ROWS = [r for r in ROWS if r[0] != "reference"]
# The contract's cases also run on the CUDA kernels emulated on the CPU (tests/cuda_emu, docs/cuda_emulation.md).
KERNEL_ROWS = [r for r in rows(emulated=True) if r[0] != "reference"]
BACKENDS = cpu_backends()  # the bad-input tests name devices in their messages: CPU only


def _dtype_id(pair) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


# ---------------------------------------------------------------------------------------------
# The reference against float64 math.

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", [r[1] for r in ROWS if r[0] == "reference"], ids=str)
def test_reference_matches_float64(device, op, pair):
    check_float64(make_case(op, [(4097,), (7, 3), (1,)], [pair[0]], [pair[1]], device=device), "reference")


def test_reference_any_nonfinite_matches_python():
    tensors = [random_tensor((n,), d) for n, d in zip((5, 300, 1), FLOAT_DTYPES)]
    with use_backend("reference"):
        assert swm_fused.any_nonfinite(tensors).item() == 0.0
        tensors[1][17] = float("inf")
        assert swm_fused.any_nonfinite(tensors).item() == 1.0


# ---------------------------------------------------------------------------------------------
# Every backend against the reference.

@pytest.mark.parametrize("size", [0, 1, 7, 4097])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_backend_matches_reference(row, op, pair, size):
    backend, device = row
    compare_to_reference(make_case(op, [(size,), (size, 2)], [pair[0]], [pair[1]], device=device), backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_large_tensor(row, op):
    backend, device = row
    compare_to_reference(make_case(op, [(2**20 + 3,)], [torch.float32], [torch.bfloat16], k=2, device=device), backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_many_small_tensors_with_mixed_dtypes(row, op):
    backend, device = row
    shapes = [(int(s),) for s in torch.randint(1, 64, (5000,))]
    compare_to_reference(make_case(op, shapes, FLOAT_DTYPES, FLOAT_DTYPES[::-1] + FLOAT_DTYPES[:1], device=device),
                         backend)


@pytest.mark.parametrize("layout", ["offset", "strided", "transposed"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_misaligned_and_non_contiguous_views(row, op, layout):
    """Views one element into their storage (vector kernels take their scalar path), strided and
    transposed views, with every dtype in one list; gaps between the views stay untouched."""
    backend, device = row
    avg_dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    src_dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32]
    compare_to_reference(make_case(op, [0, 1, 7, 4097, 33, 16385], avg_dtypes, src_dtypes, device=device,
                                   layout=layout), backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_single_tensor_stands_for_a_list(row, op):
    backend, device = row
    case = make_case(op, [(33, 5)], [torch.float32], [torch.float16], device=device)
    expected = written(run(case, backend))
    c = copy_case(case)
    with use_backend(backend):
        if op == "ema_":
            swm_fused.ema_(c["avg"][0], c["src"][0], c["decay"])
        elif op == "swa_":
            swm_fused.swa_(c["avg"][0], c["src"][0], c["n"])
        elif op == "swag_":
            swm_fused.swag_(c["avg"][0], c["sq"][0], c["src"][0], c["n"])
        elif op == "ema_multi_":
            swm_fused.ema_multi_([x[0] for x in c["avgs"]], c["src"][0], c["weights"])
        else:
            swm_fused.merge_(c["out"][0], [x[0] for x in c["inputs"]], c["weights"])
    for a, e in zip(written(c), expected):
        assert torch.equal(bits(a), bits(e))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_ema_multi_k_profiles_with_mixed_dtypes(row, k):
    """K profiles (more than one launch takes, on GPUs, from 5), the profiles' dtypes differing at a position."""
    backend, device = row
    case = make_case("ema_multi_", [(4097,), (3, 7), (1,), (0,)], [torch.float32, torch.bfloat16, torch.float64],
                     FLOAT_DTYPES, k=k, device=device)
    compare_to_reference(case, backend)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_ema_multi_equals_k_separate_ema_calls_bit_for_bit(row):
    backend, device = row
    case = make_case("ema_multi_", [(4097,), (7, 3)], [torch.float32], [torch.bfloat16], k=3, device=device)
    fused, separate = run(case, backend), copy_case(case)
    kernels = dispatch.get_backend(backend).kernels
    with torch.no_grad():
        for w, avg in zip(case["weights"], separate["avgs"]):  # what ema_(avg, src, decay) runs, w = 1 - decay
            kernels.lerp_(avg, separate["src"], w, None, None)
    for i, (a, b) in enumerate(zip(written(fused), written(separate))):
        assert torch.equal(bits(a), bits(b)), f"{backend} profile tensor {i}"


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("row", KERNEL_ROWS, ids=row_id)
def test_merge_k_inputs(row, k):
    backend, device = row
    case = make_case("merge_", [(4097,), (3, 7), (1,)], [torch.float32, torch.bfloat16], FLOAT_DTYPES, k=k,
                     device=device)
    compare_to_reference(case, backend)


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("k,alias", [(1, 0), (2, 0), (3, 2), (8, 5), (11, 0), (11, 10)])
@pytest.mark.parametrize("row", ROWS + KERNEL_ROWS[len(OTHER_ROWS):], ids=row_id)
def test_merge_in_place_when_out_is_an_input(row, k, alias, layout):
    """out is inputs[alias] (the same tensors); the other inputs have other dtypes at some positions."""
    backend, device = row
    case = make_case("merge_", [4097, 5, 1], [torch.float32, torch.bfloat16, torch.float64],
                     [torch.bfloat16, torch.float32], k=k, device=device, layout=layout, alias=alias)
    compare_to_reference(case, backend)


CPP_ROWS = [r for r in ROWS if r[0] == "cpp"]
STREAM_MIN_BYTES = 32 << 20  # csrc/cpu/merge.cpp's kStreamMinBytes


@pytest.mark.parametrize("layout", ["contiguous", "offset"])
@pytest.mark.parametrize("k,alias,out_dtype,in_dtypes", [
    (8, None, torch.float32, [torch.float32]),
    (3, None, torch.float32, [torch.float32, torch.bfloat16]),
    (2, 1, torch.float32, [torch.float32]),
    (2, None, torch.float32, [torch.float32]),
    (9, None, torch.float64, [torch.float32, torch.float64]),
    (3, None, torch.bfloat16, [torch.bfloat16]),
    (8, None, torch.bfloat16, [torch.float32]),
    (2, 0, torch.bfloat16, [torch.bfloat16]),
    (3, None, torch.float32, [torch.float16, torch.float64]),
], ids=["k8-fp32", "k3-fp32-bf16", "k2-in-place", "k2-fp32", "k9-fp64", "k3-bf16", "k8-bf16-from-fp32",
        "k2-bf16-in-place", "k3-fp16-fp64"])
@pytest.mark.parametrize("row", CPP_ROWS, ids=row_id)
def test_merge_larger_than_the_caches(row, k, alias, out_dtype, in_dtypes, layout):
    """Calls past STREAM_MIN_BYTES, where the CPU kernel writes outputs that are none of the inputs
    with non-temporal stores (every other test's call is smaller): the reference's values, bit for
    bit, with views starting off a 64-byte line and sizes ending mid-line; nothing outside the views
    changes. The two large tensors' inputs have in_dtypes[0] and in_dtypes[1]: bfloat16 inputs
    are converted in registers, others (float16, float32 into float64) through buffers."""
    backend, device = row
    per_element = out_dtype.itemsize + k * min(d.itemsize for d in in_dtypes)  # at least this, at every position
    n = STREAM_MIN_BYTES * 5 // 4 // per_element
    sizes = [n * 3 // 5 + 13, n * 2 // 5 + 1, 3]
    case = make_case("merge_", sizes, [out_dtype], in_dtypes, k=k, device=device, layout=layout, alias=alias)
    compare_to_reference(case, backend, exact=True)


def _strided_views(pair: List[Tensor]) -> List[Tensor]:
    return [pair[0].t()[::2], pair[1][:, ::3]]


def _column_major(t: Tensor) -> Tensor:
    return t.t().contiguous().t()


@pytest.mark.parametrize("op", ["ema_", "swa_", "swag_", "merge_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, op):
    """Strided outputs and column-major sources give correct results; nothing outside the views changes."""
    bases = [random_tensor((40, 30), torch.float32), random_tensor((9, 64), torch.bfloat16)]
    case = make_case(op, [v.shape for v in _strided_views(bases)], [torch.float32, torch.bfloat16], [torch.float16])
    key = "out" if op == "merge_" else "avg"
    for view, value in zip(_strided_views(bases), case[key]):
        view.copy_(value)
    expected = written(run(case, "reference"))
    before = clones(bases)
    c = copy_case(case)
    c[key] = _strided_views(bases)
    if op == "merge_":
        c["inputs"] = [[_column_major(x) for x in xs] for xs in c["inputs"]]
    else:
        c["src"] = [_column_major(x) for x in c["src"]]
    with use_backend(backend):
        apply(c, c)
    for i, (g, e) in enumerate(zip(written(c), expected)):
        assert_close(g, e, *BACKEND_TOLERANCES[e.dtype], what=f"{backend} {op} strided tensor {i}")
    outside = [torch.ones(b.shape, dtype=torch.bool) for b in bases]
    for view in _strided_views(outside):
        view.fill_(False)
    for base, old, mask in zip(bases, before, outside):
        assert torch.equal(bits(base[mask]), bits(old[mask])), f"{backend} {op} wrote outside its view"


@pytest.mark.parametrize("flag", [1.0, float("inf"), float("nan")], ids=["one", "inf", "nan"])
@pytest.mark.parametrize("op", ["ema_", "swa_", "swag_", "ema_multi_"])
@pytest.mark.parametrize("row", ROWS + KERNEL_ROWS[len(OTHER_ROWS):], ids=row_id)
def test_found_inf_set_changes_nothing_and_unset_changes_as_usual(row, op, flag):
    backend, device = row
    case = make_case(op, [(4097,), (7,)], [torch.float32, torch.bfloat16, torch.float64], [torch.float16],
                     device=device)
    case["src"][0][100] = float("nan")  # the step that found_inf flags is typically non-finite
    skipped = run(case, backend, found_inf=torch.tensor(flag, device=device))
    assert_unchanged(written(case), written(skipped), f"{backend} {op} with found_inf={flag}")
    applied = run(case, backend, found_inf=torch.zeros((1,), device=device, dtype=torch.bool))
    plain = run(case, backend)
    for a, p in zip(written(applied), written(plain)):
        assert torch.equal(bits(a), bits(p))


@pytest.mark.parametrize("op", ["swa_", "swag_"])
@pytest.mark.parametrize("row", ROWS + KERNEL_ROWS[len(OTHER_ROWS):], ids=row_id)
def test_count_as_device_tensor_equals_int(row, op):
    backend, device = row
    case = make_case(op, [(4097,), (7,)], [torch.float32, torch.float64], [torch.bfloat16], device=device)
    for a, b in zip(written(run(case, backend)), written(run(case, backend, n_as_tensor=True))):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_first_swa_update_is_an_exact_copy(row):
    backend, device = row
    case = make_case("swa_", [(4097,), (7, 3)], [torch.float32, torch.bfloat16], [torch.float32, torch.bfloat16],
                     device=device)
    case["n"] = 0
    for a, s in zip(written(run(case, backend)), case["src"]):
        assert torch.equal(bits(a), bits(s))


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_fp32_ema_matches_torch_foreach_lerp_bit_for_bit(row):
    """0 ulps from ``torch._foreach_lerp_`` on fp32 tensors, the claim docs/design.md makes."""
    backend, device = row
    case = make_case("ema_", [(4096,), (64, 33), (7,)], [torch.float32], [torch.float32], device=device)
    ours = written(run(case, backend))
    theirs = clones(case["avg"])
    torch._foreach_lerp_(theirs, case["src"], 1.0 - case["decay"])
    for i, (a, t) in enumerate(zip(ours, theirs)):
        assert torch.equal(bits(a), bits(t)), f"{backend}: tensor {i} differs from torch._foreach_lerp_"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_flatbuffers_run_once_per_storage_and_match_lists(row, op):
    backend, device = row
    shapes = [(31, 7), (4097,), (1,), (3, 3, 3)]
    case = make_case(op, shapes, [torch.float32], [torch.bfloat16], device=device)
    expected = written(run(case, backend))
    flat = copy_case(case)
    for key in ("avg", "src", "sq", "out"):
        if key in flat:
            flat[key] = FlatBuffer.from_tensors(case[key])
    for key in ("inputs", "avgs"):
        if key in flat:
            flat[key] = [FlatBuffer.from_tensors(x) for x in case[key]]
    kernels = dispatch.get_backend(backend).kernels
    primitive = {"ema_": "lerp_", "swa_": "lerp_", "ema_multi_": "lerp_multi_"}.get(op, op)
    with use_backend(backend), mock.patch.object(kernels, primitive, wraps=getattr(kernels, primitive)) as spy:
        apply(flat, flat)
    first_list = spy.call_args.args[1 if op == "ema_multi_" else 0]
    assert len(first_list) == 1 and first_list[0].dim() == 1, "a flat op must see one storage, not the views"
    got = [v for buf in _written_buffers(flat) for v in buf.views]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, *BACKEND_TOLERANCES[e.dtype], what=f"{backend} flat {op} tensor {i}")


def _written_buffers(case: Dict) -> List[FlatBuffer]:
    if case["op"] == "ema_multi_":
        return case["avgs"]
    keys = {"ema_": ["avg"], "swa_": ["avg"], "swag_": ["avg", "sq"], "merge_": ["out"]}[case["op"]]
    return [case[k] for k in keys]


@pytest.mark.parametrize("row", ROWS + KERNEL_ROWS[len(OTHER_ROWS):], ids=row_id)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "last", None])
def test_any_nonfinite(row, bad):
    backend, device = row
    tensors = [random_tensor((n,), d).to(device) for n, d in zip((4097, 1, 7, 0, 300, 16385),
                                                                FLOAT_DTYPES + (torch.float32, torch.bfloat16))]
    if bad == "last":  # the very last element of the largest tensor: the tail of its last chunk
        tensors[-1][-1] = float("nan")
    elif bad is not None:
        which = int(torch.randint(0, 3, ()).item())
        tensors[which].view(-1)[int(torch.randint(0, tensors[which].numel(), ()).item())] = bad
    with use_backend(backend):
        flag = swm_fused.any_nonfinite(tensors)
        flat_flag = swm_fused.any_nonfinite(FlatBuffer.from_tensors(tensors))
    expected = float(any(not torch.isfinite(t).all() for t in tensors))
    for f in (flag, flat_flag):
        assert f.dtype == torch.float32 and f.dim() == 0 and f.item() == expected


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, raised before anything is written, the same on every backend (one
# validator: swm_fused/ops.py for the numbers, csrc/validate.h for the tensors).

def _bad_calls():
    f32, i64 = torch.float32, torch.int64
    a = lambda *s, d=f32: random_tensor(s, d)  # noqa: E731
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    return {
        "lengths": (lambda x, y, o: swm_fused.ema_(x, y[:1], 0.9), ValueError,
                    "ema_: avg has 2 tensors but src has 1"),
        "swag_lengths": (lambda x, y, o: swm_fused.swag_(x, o[:1], y, 2), ValueError,
                         "swag_: mean has 2 tensors but sq_mean has 1"),
        "merge_lengths": (lambda x, y, o: swm_fused.merge_(o, [x, y[:1]], [0.5, 0.5]), ValueError,
                          "merge_: out has 2 tensors but inputs[1] has 1"),
        "shape": (lambda x, y, o: swm_fused.swa_(x, [y[0], a(3, 4)], 1), ValueError,
                  "swa_: shape mismatch at index 1: avg[1] has shape (3,) but src[1] has shape (3, 4)"),
        "shape_0dim": (lambda x, y, o: swm_fused.ema_(x, [y[0], a()], 0.9), ValueError,
                       "ema_: shape mismatch at index 1: avg[1] has shape (3,) but src[1] has shape ()"),
        "shape_transposed": (lambda x, y, o: swm_fused.ema_(x, [a(5, 4), y[1]], 0.9), ValueError,
                             "ema_: shape mismatch at index 0: avg[0] has shape (4, 5) but src[0] has shape (5, 4)"),
        "merge_shape": (lambda x, y, o: swm_fused.merge_(o, [x, [y[0], a(2)]], [0.5, 0.5]), ValueError,
                        "merge_: shape mismatch at index 1: out[1] has shape (3,) but inputs[1][1] has shape (2,)"),
        "swag_shape": (lambda x, y, o: swm_fused.swag_(x, [o[0], a(5)], y, 2), ValueError,
                       "swag_: shape mismatch at index 1: mean[1] has shape (3,) but sq_mean[1] has shape (5,)"),
        "int_average": (lambda x, y, o: swm_fused.ema_([x[0], a(3, d=i64)], y, 0.9), TypeError,
                        "ema_: avg[1] has dtype torch.int64; averages and outputs must be float32, float64, "
                        "bfloat16 or float16"),
        "bool_average": (lambda x, y, o: swm_fused.ema_([x[0], torch.ones(3, dtype=torch.bool)], y, 0.9),
                         TypeError, "ema_: avg[1] has dtype torch.bool;"),
        "float8_average": (lambda x, y, o: swm_fused.swa_([x[0], a(3).to(torch.float8_e4m3fn)], y, 1), TypeError,
                           "swa_: avg[1] has dtype torch.float8_e4m3fn;"),
        "int_sq_mean": (lambda x, y, o: swm_fused.swag_(x, [o[0], a(3, d=i64)], y, 2), TypeError,
                        "swag_: sq_mean[1] has dtype torch.int64; averages and outputs"),
        "int_out": (lambda x, y, o: swm_fused.merge_([a(4, 5, d=torch.int32), o[1]], [x, y], [0.5, 0.5]),
                    TypeError, "merge_: out[0] has dtype torch.int32;"),
        "int_source": (lambda x, y, o: swm_fused.ema_(x, [y[0], torch.ones(3, dtype=i64)], 0.9), TypeError,
                       "ema_: src[1] has dtype torch.int64; sources must be floating point"),
        "complex_source": (lambda x, y, o: swm_fused.swag_(x, o, [a(4, 5).to(torch.complex64), y[1]], 2),
                           TypeError, "swag_: src[0] has dtype torch.complex64; sources must be floating point"),
        "int_merge_input": (lambda x, y, o: swm_fused.merge_(o, [x, [y[0], a(3, d=torch.uint8)]], [0.5, 0.5]),
                            TypeError, "merge_: inputs[1][1] has dtype torch.uint8; sources must be floating point"),
        "decay_high": (lambda x, y, o: swm_fused.ema_(x, y, 1.5), ValueError, "decay"),
        "decay_negative": (lambda x, y, o: swm_fused.ema_(x, y, -0.1), ValueError, "decay"),
        "decay_nan": (lambda x, y, o: swm_fused.ema_(x, y, float("nan")), ValueError, "decay"),
        "weights_count": (lambda x, y, o: swm_fused.merge_(o, [x, y], [0.5]), ValueError, "1 weights for 2"),
        "weights_nan": (lambda x, y, o: swm_fused.merge_(o, [x, y], [0.5, float("nan")]), ValueError,
                        "weights[1]"),
        "negative_count": (lambda x, y, o: swm_fused.swa_(x, y, -1), ValueError, "n_averaged"),
        "found_inf_shape": (lambda x, y, o: swm_fused.ema_(x, y, 0.9, found_inf=torch.zeros(2)), ValueError,
                            "found_inf"),
        "found_inf_device": (lambda x, y, o: swm_fused.ema_(x, y, 0.9, found_inf=meta()), ValueError,
                             "ema_: found_inf is on meta but the tensors are on cpu"),
        "not_a_tensor": (lambda x, y, o: swm_fused.ema_(x, [y[0], [1.0, 2.0, 3.0]], 0.9), TypeError,
                         "ema_: src[1] is a list, not a Tensor"),
        "meta_device": (lambda x, y, o: swm_fused.ema_(x, [y[0], meta(3)], 0.9), ValueError,
                        "ema_: src[1] is on meta but avg[0] is on cpu; all tensors must be on one device"),
        "swag_meta_device": (lambda x, y, o: swm_fused.swag_(x, [o[0], meta(3)], y, 2), ValueError,
                             "swag_: sq_mean[1] is on meta but mean[0] is on cpu"),
        "merge_meta_device": (lambda x, y, o: swm_fused.merge_(o, [x, [meta(4, 5), y[1]]], [0.5, 0.5]),
                              ValueError, "merge_: inputs[1][0] is on meta but out[0] is on cpu"),
        "any_nonfinite_meta_device": (lambda x, y, o: swm_fused.any_nonfinite([x[0], y[1], meta(2)]), ValueError,
                                      "any_nonfinite: tensors[2] is on meta but tensors[0] is on cpu"),
        "merge_device_weights": (lambda x, y, o: swm_fused.merge_(o, [x, y], torch.ones(2, device="meta")),
                                 ValueError, "merge_: weights must be numbers or a CPU tensor"),
        # Several rules broken at once: the first in the contract's order wins, on every backend.
        "lengths_before_dtype": (lambda x, y, o: swm_fused.ema_([a(4, 5, d=i64), x[1]], y[:1], 0.9), ValueError,
                                 "ema_: avg has 2 tensors but src has 1"),
        "dtype_before_shape": (lambda x, y, o: swm_fused.ema_(x, [a(2, d=i64), y[1]], 0.9), TypeError,
                               "ema_: src[0] has dtype torch.int64; sources must be floating point"),
        "list_by_list": (lambda x, y, o: swm_fused.ema_([x[0], a(3, d=i64)], [meta(4, 5), y[1]], 0.9), TypeError,
                         "ema_: avg[1] has dtype torch.int64"),
        "index_by_index": (lambda x, y, o: swm_fused.ema_(x, [a(1), a(3, d=i64)], 0.9), ValueError,
                           "ema_: shape mismatch at index 0"),
        "device_before_later_dtype": (lambda x, y, o: swm_fused.merge_(o, [[meta(4, 5), x[1]], [y[0], a(3, d=i64)]],
                                                                       [0.5, 0.5]), ValueError,
                                      "merge_: inputs[0][0] is on meta but out[0] is on cpu"),
        "multi_lengths": (lambda x, y, o: swm_fused.ema_multi_([x, o[:1]], y, [0.5, 0.5]), ValueError,
                          "ema_multi_: src has 2 tensors but avgs[1] has 1"),
        "multi_weight_range": (lambda x, y, o: swm_fused.ema_multi_([x, o], y, [0.5, 1.5]), ValueError,
                               "ema_multi_: weights[1] must be in [0, 1], got 1.5"),
        "multi_weights_count": (lambda x, y, o: swm_fused.ema_multi_([x, o], y, [0.5]), ValueError,
                                "ema_multi_: got 1 weights for 2 average lists"),
        "multi_int_average": (lambda x, y, o: swm_fused.ema_multi_([x, [o[0], a(3, d=i64)]], y, [0.5, 0.5]),
                              TypeError, "ema_multi_: avgs[1][1] has dtype torch.int64; averages and outputs"),
        "multi_shape": (lambda x, y, o: swm_fused.ema_multi_([x, o], [y[0], a(2)], [0.5, 0.5]), ValueError,
                        "ema_multi_: shape mismatch at index 1: avgs[0][1] has shape (3,) but src[1] has shape (2,)"),
        "multi_found_inf": (lambda x, y, o: swm_fused.ema_multi_([x], y, [0.5], found_inf=torch.zeros(3)), ValueError,
                            "ema_multi_: found_inf must hold exactly one element"),
        "multi_not_lists": (lambda x, y, o: swm_fused.ema_multi_(x[0], y, [0.5]), TypeError,
                            "ema_multi_: avgs must be a list of K tensor lists"),
        "scalars_before_tensors": (lambda x, y, o: swm_fused.ema_([x[0], a(3, d=i64)], y, 2.0), ValueError,
                                   "ema_: decay must be in [0, 1]"),
    }


def _bad_input_data():
    x = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.bfloat16)]
    y = [random_tensor((4, 5), torch.float16), random_tensor((3,), torch.float32)]
    o = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.float32)]
    return x, y, o


@pytest.mark.parametrize("name", list(_bad_calls()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clearly_and_writes_nothing(backend, name):
    call, error, text = _bad_calls()[name]
    x, y, o = _bad_input_data()
    before = clones(x + y + o)
    with use_backend(backend), pytest.raises(error, match=re.escape(text)) as raised:
        call(x, y, o)
    assert_unchanged(before, x + y + o, f"{backend} {name}")
    with use_backend("reference"), pytest.raises(error) as expected:
        call(*(clones(t) for t in (x, y, o)))
    assert str(raised.value) == str(expected.value)


def _dtypes_that_are_never_averages() -> List[torch.dtype]:
    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)} - set(FLOAT_DTYPES)
    constructible = []
    for dtype in sorted(dtypes, key=str):
        try:
            torch.empty(1, dtype=dtype)
        except (RuntimeError, TypeError):
            continue
        constructible.append(dtype)
    return constructible


@pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 is experimental, quantized dtypes deprecated
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_dtype_is_named_as_python_prints_it(backend):
    """Each rejected dtype's message equals the Python checks' (which print str(dtype))."""
    x, y, _ = _bad_input_data()
    for dtype in _dtypes_that_are_never_averages():
        calls = [lambda: swm_fused.ema_([x[0], torch.empty(3, dtype=dtype)], y, 0.9)]
        if not dtype.is_floating_point:
            calls.append(lambda: swm_fused.ema_(x, [y[0], torch.empty(3, dtype=dtype)], 0.9))
        for call in calls:
            messages = []
            for b in ("reference", backend):
                with use_backend(b), pytest.raises(TypeError) as raised:
                    call()
                messages.append(str(raised.value))
            assert str(dtype) in messages[0] and messages[1] == messages[0], f"{backend} {dtype}"


def _flat_pair(avg_specs, src_specs):
    """Two FlatBuffers with one layout, built from (shape, dtype, device) specs, with random values."""
    avg, src = FlatBuffer(avg_specs), FlatBuffer(src_specs)
    for s in avg.storages + src.storages:
        if s.device.type != "meta":
            s.copy_(random_tensor(s.shape, torch.float64))
    assert avg.layout_key() == src.layout_key()
    return avg, src


_BAD_FLAT = {  # the second group starts at view 2, so a storage's message must name view 2
    "int_group": ([((4, 5), torch.float32, "cpu"), ((3,), torch.float32, "cpu"), ((2,), torch.int64, "cpu")],
                  [((4, 5), torch.float16, "cpu"), ((3,), torch.float16, "cpu"), ((2,), torch.float32, "cpu")],
                  TypeError, "ema_: avg[2] has dtype torch.int64"),
    "meta_group": ([((4, 5), torch.float32, "cpu"), ((3,), torch.float32, "cpu"), ((2,), torch.float16, "cpu")],
                   [((4, 5), torch.float16, "cpu"), ((3,), torch.float16, "cpu"), ((2,), torch.float32, "meta")],
                   ValueError, "ema_: src[2] is on meta but avg[0] is on cpu"),
}


@pytest.mark.parametrize("name", list(_BAD_FLAT))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_flat_input_names_the_view_like_a_list_would(backend, name):
    avg_specs, src_specs, error, text = _BAD_FLAT[name]
    avg, src = _flat_pair(avg_specs, src_specs)
    before = clones([s for s in avg.storages + src.storages if s.device.type != "meta"])
    with use_backend(backend), pytest.raises(error, match=re.escape(text)) as raised:
        swm_fused.ema_(avg, src, 0.9)
    assert_unchanged(before, [s for s in avg.storages + src.storages if s.device.type != "meta"], name)
    with use_backend("reference"), pytest.raises(error) as as_lists:
        swm_fused.ema_(list(avg.views), list(src.views), 0.9)
    assert str(raised.value) == str(as_lists.value)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_any_nonfinite_leaves_out_tensors_that_cannot_hold_nan(row):
    """Integer and bool tensors are left out entirely (even on another device), so a whole
    state_dict can be checked; the result is the same on every backend."""
    backend, device = row
    ints = [torch.randint(-9, 9, (5,), device=device), torch.ones(3, dtype=torch.bool, device=device),
            torch.ones(2, dtype=torch.int64, device="meta")]
    floats = [random_tensor((7,), torch.bfloat16).to(device), random_tensor((4,), torch.float32).to(device)]
    floats[1][int(torch.randint(0, 4, ()).item())] = float("nan")
    with use_backend(backend):
        assert swm_fused.any_nonfinite(ints + floats).item() == 1.0
        assert swm_fused.any_nonfinite(floats[:1] + ints).item() == 0.0
        only_ints = swm_fused.any_nonfinite(ints[:2])
        mixed_flat = swm_fused.any_nonfinite(FlatBuffer.from_tensors(ints[:2] + floats))
    assert only_ints.item() == 0.0 and only_ints.dtype == torch.float32 and only_ints.dim() == 0
    assert only_ints.device == device and mixed_flat.item() == 1.0


def test_empty_lists_are_a_no_op():
    swm_fused.ema_([], [], 0.9)
    swm_fused.merge_([], [[], []], [0.5, 0.5])
    assert swm_fused.any_nonfinite([]).item() == 0.0


# ---------------------------------------------------------------------------------------------
# BoundLists: the same ops on lists bound once.

@pytest.mark.parametrize("op", ["ema_", "swa_", "swag_"])
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_bound_lists_give_the_plain_ops_results_bit_for_bit(row, op):
    backend, device = row
    case = make_case(op, [(4097,), (7, 3), (1,), (0,)], [torch.float32, torch.bfloat16], [torch.float16, torch.float32],
                     device=device)
    case["src"][1][2, 1] = float("nan")
    plain, bound = copy_case(case), copy_case(case)
    keys = ["avg", "sq", "src"] if op == "swag_" else ["avg", "src"]
    with use_backend(backend):
        handle = swm_fused.BoundLists(*[bound[k] for k in keys])
        for step in range(3):
            flag_plain = swm_fused.any_nonfinite(plain["src"])
            flag_bound = handle.any_nonfinite()
            assert torch.equal(flag_plain, flag_bound)
            found_inf = None if step == 1 else flag_bound
            if op == "ema_":
                swm_fused.ema_(plain["avg"], plain["src"], case["decay"], found_inf=flag_plain if found_inf is not None else None)
                handle.ema_(case["decay"], found_inf=found_inf)
            else:
                n = torch.tensor(step, device=device) if step == 2 else step
                args = [plain[k] for k in keys]
                getattr(swm_fused, op)(*args, n, found_inf=flag_plain if found_inf is not None else None)
                getattr(handle, op)(n, found_inf=found_inf)
    for i, (a, b) in enumerate(zip(written(plain), written(bound))):
        assert torch.equal(bits(a), bits(b)), f"{backend} bound {op} tensor {i}"


def test_bound_lists_validate_every_call_and_name_the_op():
    avg = [random_tensor((4, 5), torch.float32), random_tensor((3,), torch.float32)]
    src = [random_tensor((4, 5), torch.bfloat16), random_tensor((3,), torch.float32)]
    handle = swm_fused.BoundLists(avg, src)
    before = clones(avg)
    with pytest.raises(ValueError, match=re.escape("ema_: decay must be in [0, 1]")):
        handle.ema_(1.5)
    with pytest.raises(ValueError, match=re.escape("swag_: needs 3 bound lists")):
        handle.swag_(1)
    with pytest.raises(ValueError, match=re.escape("found_inf must hold exactly one element")):
        handle.ema_(0.9, found_inf=torch.zeros(2))
    src[1].resize_(5)  # changed behind the binding's back: still checked
    with pytest.raises(ValueError, match=re.escape("swa_: shape mismatch at index 1")):
        handle.swa_(2)
    assert_unchanged(before, avg, "rejected bound calls")
    with pytest.raises(ValueError, match="lists\\[0\\] has 2 tensors but lists\\[1\\] has 1"):
        swm_fused.BoundLists(avg, src[:1])


def test_bound_lists_of_flatbuffers_and_of_nothing():
    params = [random_tensor((33, 5), torch.bfloat16), random_tensor((7,), torch.bfloat16)]
    avg = FlatBuffer.from_tensors(params, dtype=torch.float32)
    expected = FlatBuffer.from_tensors(params, dtype=torch.float32)
    src = FlatBuffer.from_tensors([p * 2 for p in params])
    swm_fused.BoundLists(avg, src).ema_(0.75)
    swm_fused.ema_(expected, src, 0.75)
    assert all(torch.equal(a, e) for a, e in zip(avg.storages, expected.storages))
    empty = swm_fused.BoundLists([], [])
    empty.ema_(0.5)
    assert empty.any_nonfinite().item() == 0.0
    ints = swm_fused.BoundLists([torch.ones(3, dtype=torch.int64)])
    assert ints.any_nonfinite().item() == 0.0


@pytest.mark.parametrize("mode", ["ema", "swa"])
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_bound_step_is_check_average_and_count_in_one_call(row, mode):
    """BoundLists.step_ equals any_nonfinite + ema_/swa_ with found_inf + the counter update, bit for bit."""
    backend, device = row
    case = make_case("ema_", [(4097,), (7, 3), (1,)], [torch.float32, torch.bfloat16], [torch.float16],
                     device=device)
    plain, bound = copy_case(case), copy_case(case)
    counts_plain = torch.tensor([3, 3], device=device)
    counts_bound = counts_plain.clone()
    with use_backend(backend):
        handle = swm_fused.BoundLists(bound["avg"], bound["src"])
        for step in range(4):
            if step == 2:  # a NaN step: skipped, not counted
                plain["src"][1][0, 0] = bound["src"][1][0, 0] = float("nan")
            if step == 3:
                plain["src"][1][0, 0] = bound["src"][1][0, 0] = 1.0
            flag = swm_fused.any_nonfinite(plain["src"])
            if mode == "ema":
                swm_fused.ema_(plain["avg"], plain["src"], case["decay"], found_inf=flag)
            else:
                swm_fused.swa_(plain["avg"], plain["src"], counts_plain[0], found_inf=flag)
            counts_plain.sub_(flag.to(torch.int64)).add_(1)
            got = handle.step_(counts_bound, decay=case["decay"] if mode == "ema" else None)
            assert torch.equal(got, flag)
    assert torch.equal(counts_plain, counts_bound) and counts_bound.tolist() == [6, 6]
    for i, (a, b) in enumerate(zip(written(plain), written(bound))):
        assert torch.equal(bits(a), bits(b)), f"{backend} step_ tensor {i}"


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_bound_step_multi_is_check_k_averages_and_counters_in_one_call(row, k):
    """BoundLists.step_multi_ equals any_nonfinite + ema_multi_ with found_inf + the counter updates, bit
    for bit, on every backend (the compiled one through one C++ call, the others through the plain ops)."""
    backend, device = row
    case = make_case("ema_multi_", [(4097,), (7, 3), (1,)], [torch.float32, torch.bfloat16, torch.float64],
                     [torch.float16, torch.float32], k=k, device=device)
    plain, bound = copy_case(case), copy_case(case)
    counts_plain = [torch.tensor([j], device=device) for j in range(k)]
    skipped_plain = [torch.tensor(5 * j, device=device) for j in range(k)]
    counts_bound, skipped_bound = clones(counts_plain), clones(skipped_plain)
    with use_backend(backend):
        handle = swm_fused.BoundLists(*bound["avgs"], bound["src"])
        for step in range(4):
            weights = [random.random() for _ in range(k)]
            if step == 2:  # a NaN step: skipped, counted as skipped
                plain["src"][1][0, 0] = bound["src"][1][0, 0] = float("nan")
            if step == 3:
                plain["src"][1][0, 0] = bound["src"][1][0, 0] = 1.0
            flag = swm_fused.any_nonfinite(plain["src"])
            swm_fused.ema_multi_(plain["avgs"], plain["src"], weights, found_inf=flag)
            for c in counts_plain:
                c.sub_(flag.to(torch.int64)).add_(1)
            for s in skipped_plain:
                s.add_(flag.to(torch.int64))
            got = handle.step_multi_(weights, counts_bound, skipped=skipped_bound)
            assert torch.equal(got, flag)
        unchecked = handle.step_multi_([0.5] * k, counts_bound[:1], skip_nonfinite=False)
        swm_fused.ema_multi_(plain["avgs"], plain["src"], [0.5] * k)
        counts_plain[0].add_(1)
    assert unchecked is None
    assert [c.tolist() for c in counts_bound] == [c.tolist() for c in counts_plain] == \
        [[j + 3 + (j == 0)] for j in range(k)]
    assert [int(s) for s in skipped_bound] == [int(s) for s in skipped_plain] == [5 * j + 1 for j in range(k)]
    for i, (a, b) in enumerate(zip(written(plain), written(bound))):
        assert torch.equal(bits(a), bits(b)), f"{backend} step_multi_ tensor {i}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_step_multi_validates_and_names_the_op(backend):
    avgs = [[random_tensor((4, 5), torch.float32), random_tensor((3,), torch.float32)] for _ in range(2)]
    src = [random_tensor((4, 5), torch.bfloat16), random_tensor((3,), torch.float32)]
    before = clones([t for x in avgs for t in x])
    counts = [torch.zeros(1, dtype=torch.int64)]
    with use_backend(backend):
        handle = swm_fused.BoundLists(*avgs, src)
        with pytest.raises(ValueError, match=re.escape("step_multi_: got 3 weights for 2 average lists")):
            handle.step_multi_([0.1, 0.2, 0.3], counts)
        with pytest.raises(ValueError, match=re.escape("step_multi_: weights[1] must be in [0, 1], got 1.5")):
            handle.step_multi_([0.1, 1.5], counts)
        with pytest.raises(TypeError, match=re.escape("step_multi_: weights must be a sequence of numbers")):
            handle.step_multi_(0.1, counts)
        with pytest.raises(TypeError, match=re.escape("step_multi_: counts must be a sequence of Tensors")):
            handle.step_multi_([0.1, 0.2], [1])
        with pytest.raises(ValueError, match=re.escape("step_multi_: needs K >= 1 average lists and the source")):
            swm_fused.BoundLists(src).step_multi_([], counts)
        src[1].resize_(5)  # changed behind the binding's back: the validator still sees it
        with pytest.raises(ValueError, match=re.escape("step_multi_: shape mismatch at index 1")):
            handle.step_multi_([0.1, 0.2], counts)
    assert_unchanged(before, [t for x in avgs for t in x], "rejected step_multi_ calls")
    assert counts[0].item() == 0
