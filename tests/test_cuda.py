"""The cuda backend against the reference backend, both on the GPU, on identical copies of fresh random data.

Covers every op across dtype pairs, sizes 0/1/7/4097/2^20+3, contiguous, misaligned (vector vs
scalar path), strided and transposed layouts, 5,000 small tensors, K = 1, 2, 3, 8 and 11 merges
(11 chains launches) with negative weights and in-place aliasing, found_inf set and unset,
FlatBuffers, and that nothing synchronises with the host. Skips without CUDA or the CUDA kernels.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused import FlatBuffer, use_backend
from swm_fused.backends import cuda as cuda_backend

_UNAVAILABLE = cuda_backend.unavailable_reason()
if _UNAVAILABLE:
    pytest.skip(f"cuda backend unavailable: {_UNAVAILABLE}", allow_module_level=True)

from _helpers import BACKEND_TOLERANCES, FLOAT_DTYPES, assert_close, assert_unchanged  # noqa: E402

DEVICE = torch.device("cuda")
SIZES = (0, 1, 7, 4097, 2**20 + 3)
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
LERP_OPS = ("ema_", "swa_", "swa_tensor_n", "swag_")
WRITTEN = ("avg", "sq", "out")


def _ids(pair: Sequence[torch.dtype]) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


# Layouts: (written base shape, written view, read base shape, read view) for a view of s elements.
# "offset" views start one element into their storage, so the kernels take the unaligned scalar path.
Layout = Tuple[Callable[[int], tuple], Callable[[Tensor], Tensor], Callable[[int], tuple], Callable[[Tensor], Tensor]]
LAYOUTS: Dict[str, Layout] = {
    "contiguous": (lambda s: (s,), lambda t: t, lambda s: (s,), lambda t: t),
    "offset": (lambda s: (s + 1,), lambda t: t[1:], lambda s: (s + 1,), lambda t: t[1:]),
    "strided": (lambda s: (s, 2), lambda t: t[:, 1], lambda s: (s, 3), lambda t: t[:, 2]),
    "transposed": (lambda s: (3, s), lambda t: t.t(), lambda s: (3, s), lambda t: t.t()),
}


def rand(shape, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    return (torch.randn(shape, dtype=torch.float64, device=DEVICE) * scale).to(dtype)


def make_case(op: str, avg_dtypes: Sequence[torch.dtype], src_dtypes: Sequence[torch.dtype], sizes: Sequence[int],
              layout: str = "contiguous", k: int = 3, alias: Optional[int] = None) -> Dict:
    """Base tensors for `op` (dtypes cycle over positions); the op itself sees the layout's views of them.

    For merges, `alias=j` makes out the very same tensors as inputs[j] (which then take out's dtypes).
    """
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    avg_dt = [avg_dtypes[i % len(avg_dtypes)] for i in range(len(sizes))]
    src_dt = [src_dtypes[i % len(src_dtypes)] for i in range(len(sizes))]
    weights = [random.uniform(-1.0, 1.5) for _ in range(k)]
    weights[-1] = -abs(weights[-1]) - 0.1  # always one negative weight (task arithmetic)
    case: Dict = {"op": op, "layout": layout, "alias": alias, "weights": weights,
                  "decay": random.uniform(0.5, 0.999), "n": random.randrange(0, 9)}
    if op == "merge_":
        case["inputs"] = [[rand(r_shape(s), d) for s, d in zip(sizes, src_dt)] for _ in range(k)]
        if alias is None:
            case["out"] = [torch.full(w_shape(s), float("nan"), dtype=d, device=DEVICE) for s, d in zip(sizes, avg_dt)]
        else:
            case["out"] = [rand(w_shape(s), d) for s, d in zip(sizes, avg_dt)]
            case["inputs"][alias] = case["out"]
        return case
    case["avg"] = [rand(w_shape(s), d) for s, d in zip(sizes, avg_dt)]
    case["src"] = [rand(r_shape(s), d, scale=2.0) for s, d in zip(sizes, src_dt)]
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
    return c


def run(case: Dict, backend: str, found_inf: Optional[Tensor] = None) -> Dict:
    """Apply the case's op under `backend` to views of a copy of its tensors; return the copy."""
    c = copy_case(case)
    _, w_view, _, r_view = LAYOUTS[c["layout"]]
    views = {key: [(w_view if key in WRITTEN else r_view)(t) for t in c[key]]
             for key in ("avg", "src", "sq", "out") if key in c}
    with use_backend(backend):
        op = c["op"]
        if op == "ema_":
            swm_fused.ema_(views["avg"], views["src"], c["decay"], found_inf=found_inf)
        elif op in ("swa_", "swa_tensor_n"):
            n = torch.tensor(c["n"], device=DEVICE) if op == "swa_tensor_n" else c["n"]
            swm_fused.swa_(views["avg"], views["src"], n, found_inf=found_inf)
        elif op == "swag_":
            swm_fused.swag_(views["avg"], views["sq"], views["src"], torch.tensor(c["n"], device=DEVICE),
                            found_inf=found_inf)
        else:
            # inputs[alias] gets out's very view objects: a true in-place merge
            inputs = [views["out"] if k == c["alias"] else [r_view(t) for t in x] for k, x in enumerate(c["inputs"])]
            swm_fused.merge_(views["out"], inputs, c["weights"])
    return c


def written(c: Dict) -> List[Tensor]:
    return [t for key in WRITTEN for t in c.get(key, [])]


def read_only(c: Dict) -> List[Tensor]:
    if "inputs" in c:
        return [t for k, x in enumerate(c["inputs"]) if k != c["alias"] for t in x]
    return list(c["src"])


def check_against_reference(case: Dict, found_inf: Optional[Tensor] = None) -> None:
    """cuda and reference write the same values (bases compared, so untouched gaps count too);
    cuda leaves read-only inputs bit-identical."""
    expected = run(case, "reference", found_inf)
    actual = run(case, "cuda", found_inf)
    for i, (a, e) in enumerate(zip(written(actual), written(expected))):
        atol, rtol = BACKEND_TOLERANCES[a.dtype]
        assert_close(a, e, atol, rtol, f"{case['op']} written[{i}] ({a.dtype}, {tuple(a.shape)})")
    assert_unchanged(read_only(case), read_only(actual), f"{case['op']} read-only inputs")


# ---------------------------------------------------------------------------------------------
# Running averages

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("op", LERP_OPS)
def test_lerp_ops_dtype_pairs(op, pair):
    check_against_reference(make_case(op, [pair[0]], [pair[1]], SIZES))


@pytest.mark.parametrize("layout", ["offset", "strided", "transposed"])
@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_non_contiguous_and_unaligned(op, layout):
    avg_dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    src_dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32]
    check_against_reference(make_case(op, avg_dtypes, src_dtypes, SIZES + (33, 16385), layout=layout))


@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_every_dtype_pair_in_one_list(op):
    pairs = DTYPE_PAIRS * 2
    sizes = [random.choice((0, 1, 7, 100, 4097, 20000)) for _ in pairs]
    check_against_reference(make_case(op, [p[0] for p in pairs], [p[1] for p in pairs], sizes))


@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_5000_small_tensors(op):
    sizes = [random.randrange(0, 300) for _ in range(5000)]
    check_against_reference(make_case(op, [torch.float32, torch.bfloat16, torch.float32],
                                      [torch.bfloat16, torch.bfloat16, torch.float16], sizes))


def test_source_dtype_without_kernel_is_converted():
    """A float8 source goes through an exact float32 conversion first."""
    fp8 = torch.float8_e5m2
    case = make_case("ema_", [torch.float32, torch.bfloat16], [torch.float32], SIZES)
    case["src"] = [t.to(fp8) for t in case["src"]]
    check_against_reference(case)


@pytest.mark.parametrize("flag", [1.0, float("inf"), float("nan"), 0.0], ids=["one", "inf", "nan", "zero"])
@pytest.mark.parametrize("op", LERP_OPS)
def test_found_inf(op, flag):
    case = make_case(op, [torch.float32, torch.bfloat16, torch.float64], [torch.bfloat16, torch.float32], SIZES)
    found_inf = torch.tensor(flag, device=DEVICE)
    if flag == 0.0:
        check_against_reference(case, found_inf)
    else:
        after = run(case, "cuda", found_inf)
        assert_unchanged(written(case), written(after), f"{op} with found_inf={flag}")


@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_flat_buffers(op):
    shapes = [(7, 3), (4097,), (0,), (1,), (33, 65)]
    avgs = [rand(s, torch.float32) for s in shapes]
    srcs = [rand(s, torch.bfloat16) for s in shapes]
    others = [rand(s, torch.float16) for s in shapes]
    results = {}
    for backend in ("reference", "cuda"):
        flat_avg = FlatBuffer.from_tensors(avgs)
        flat_src = FlatBuffer.from_tensors(srcs)
        flat_sq = FlatBuffer.from_tensors([a * a for a in avgs])
        flat_other = FlatBuffer.from_tensors(others)
        with use_backend(backend):
            if op == "ema_":
                swm_fused.ema_(flat_avg, flat_src, 0.99)
            elif op == "swa_":
                swm_fused.swa_(flat_avg, flat_src, 4)
            elif op == "swa_tensor_n":
                swm_fused.swa_(flat_avg, flat_src, torch.tensor(4, device=DEVICE))
            elif op == "swag_":
                swm_fused.swag_(flat_avg, flat_sq, flat_src, torch.tensor(2, device=DEVICE))
            else:
                swm_fused.merge_(flat_avg, [flat_avg, flat_src, flat_other], [0.7, 0.6, -0.3])
        results[backend] = flat_avg.views + flat_sq.views
    for i, (a, e) in enumerate(zip(results["cuda"], results["reference"])):
        assert_close(a, e, *BACKEND_TOLERANCES[a.dtype], f"{op} FlatBuffer view {i}")


# ---------------------------------------------------------------------------------------------
# Merges

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 11])
def test_merge_dtype_pairs(k, pair):
    check_against_reference(make_case("merge_", [pair[0]], [pair[1]], SIZES, k=k))


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("k,alias", [(1, 0), (2, 0), (3, 2), (8, 5), (11, 0), (11, 9), (11, 10)])
def test_merge_in_place(k, alias, layout):
    """out is inputs[alias]; other inputs have other dtypes at some positions."""
    case = make_case("merge_", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                     [torch.bfloat16, torch.bfloat16, torch.float32], SIZES, layout=layout, k=k, alias=alias)
    check_against_reference(case)


def test_merge_mixed_input_dtypes_at_one_position():
    """Inputs of one position with different dtypes (each converted to the compute type first)."""
    sizes = (4097, 7, 2**20 + 3)
    case = make_case("merge_", [torch.float32, torch.bfloat16, torch.float64], [torch.float32], sizes, k=4)
    mixes = [torch.bfloat16, torch.float16, torch.float64, torch.float32]
    case["inputs"] = [[t.to(mixes[(k + i) % 4]) for i, t in enumerate(x)] for k, x in enumerate(case["inputs"])]
    check_against_reference(case)


# ---------------------------------------------------------------------------------------------
# any_nonfinite

@pytest.mark.parametrize("layout", ["contiguous", "offset", "transposed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("poison", ["none", "nan", "inf", "-inf", "last"])
def test_any_nonfinite(poison, dtype, layout):
    w_shape, w_view, _, _ = LAYOUTS[layout]
    tensors = [w_view(rand(w_shape(s), dtype)) for s in SIZES + (16385, 33)]
    if poison != "none":
        candidates = [t for t in tensors if t.numel()]
        if poison == "last":  # the very last element of the largest tensor: the scalar tail of its last chunk
            target = max(candidates, key=Tensor.numel)
            flat_index = target.numel() - 1
        else:
            target = random.choice(candidates)
            flat_index = random.randrange(target.numel())
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "last": float("nan")}[poison]
        target[tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), target.shape))] = value
    results = {}
    for backend in ("reference", "cuda"):
        with use_backend(backend):
            results[backend] = swm_fused.any_nonfinite(tensors)
    flag = results["cuda"]
    assert flag.shape == () and flag.dtype == torch.float32 and flag.device.type == "cuda"
    assert flag.item() == (0.0 if poison == "none" else 1.0)
    assert flag.item() == results["reference"].item()


def test_any_nonfinite_many_tensors_and_exotic_dtype():
    tensors = [rand((random.randrange(0, 200),), random.choice(FLOAT_DTYPES)) for _ in range(5000)]
    with_inf = rand((513,), torch.float32)
    with_inf[511] = float("inf")
    with use_backend("cuda"):
        assert swm_fused.any_nonfinite(tensors).item() == 0.0
        assert swm_fused.any_nonfinite(tensors + [with_inf.to(torch.float8_e5m2)]).item() == 1.0
        last_nonempty = [t for t in tensors if t.numel()][-1]
        last_nonempty[-1] = float("nan")
        assert swm_fused.any_nonfinite(tensors).item() == 1.0


# ---------------------------------------------------------------------------------------------
# No host synchronisation

def test_no_host_sync():
    """found_inf, n_averaged and the any_nonfinite flag stay on the device: the GPU never syncs."""
    sizes = (4097, 7, 1, 2**20 + 3)
    avgs = [rand(s, torch.float32) for s in sizes]
    sqs = [a * a for a in avgs]
    srcs = [rand(s, torch.bfloat16) for s in sizes]
    outs = [torch.full((s,), float("nan"), dtype=torch.bfloat16, device=DEVICE) for s in sizes]

    def sequence(backend: str, sync_mode: str) -> List[Tensor]:
        a, q, s, o = ([t.clone() for t in x] for x in (avgs, sqs, srcs, outs))
        s_bad = [t.clone() for t in s]
        s_bad[1][3] = float("nan")
        n = torch.tensor(3, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            with use_backend(backend):
                flag = swm_fused.any_nonfinite(s)
                swm_fused.ema_(a, s, 0.9, found_inf=flag)
                swm_fused.swa_(a, s, n, found_inf=flag)
                swm_fused.swag_(a, q, s, n, found_inf=flag)
                swm_fused.merge_(o, [a, s, q], [0.5, -0.25, 0.125])
                flag = swm_fused.any_nonfinite(s_bad)  # a NaN: these steps must be skipped, still without a sync
                swm_fused.ema_(a, s_bad, 0.5, found_inf=flag)
                swm_fused.swag_(a, q, s_bad, n, found_inf=flag)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return a + q + o

    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is live: a real sync raises
            torch.ones(1, device=DEVICE).item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    actual = sequence("cuda", "error")
    expected = sequence("reference", "default")
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, *BACKEND_TOLERANCES[a.dtype], f"no-sync sequence result {i}")
