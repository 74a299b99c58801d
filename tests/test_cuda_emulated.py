"""The CUDA kernels, compiled for the host through tests/cuda_emu, against the reference backend.

csrc/cuda/*.cu and csrc/cuda/bindings.cpp are built unchanged (bar the launch syntax) with an
emulation header, and their ops run on CPU tensors as ``torch.ops.swm_fused_emu.*`` (see
docs/cuda_emulation.md). Every case calls the primitives of both backends directly, on identical
copies of fresh random data, and compares whole base tensors, so canary elements around each view
catch writes outside it; read-only inputs must stay bit-identical.

Covered: sizes 0/1/7/4097/16383..16385/2^20+3, all 16 (written, read) dtype pairs, misaligned views
(scalar path), strided and transposed views (the bindings' contiguous temporaries), float8 sources,
found_inf set (bitwise no-op) and unset, weight_tensor, 5,000 small tensors (many launches),
merges with K = 1..9, 11, 16 and 17 (chained launches past 8) with negative weights and in-place aliasing,
any_nonfinite with NaN/Inf/-Inf anywhere, at the very last element, and NaN sentinels just
outside each view; lerp_multi_ (K = 1..6, mixed avg dtypes at one position, found_inf), sq_norm (the
block reduction: sizes 0..2^20+3, every dtype, with and without scale, 3,001 tensors, bit-identical
reruns in both scheduler orders) and sam_ascent_ (bit for bit for float32/float64 params); and the
emulated block cooperation itself: __shfl_down_sync's lane rule, __syncthreads ordering __shared__
memory (and its absence failing), divergent barriers failing with a message.
Skips only when there is no host C++ compiler (and never when CI=true).
"""
from __future__ import annotations

import itertools
import os
import random
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

from _helpers import BACKEND_TOLERANCES, FLOAT_DTYPES, assert_close, assert_unchanged
from cuda_emu import backend as emu_backend
from cuda_emu import build as emu_build
from swm_fused.backends import reference as ref

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EMU = emu_backend.load()
_REASON = EMU.unavailable_reason()
if _REASON and EMU.compiler is None and not _IN_CI:
    pytest.skip(f"no host C++ compiler to build the emulated CUDA kernels: {_REASON}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _emulated_build(request):
    """A failed build fails test_emulated_build_is_available (below) and skips the rest with a pointer to it."""
    if _REASON and request.node.name != "test_emulated_build_is_available":
        pytest.skip("the emulated CUDA build is unavailable; see test_emulated_build_is_available")


def test_emulated_build_is_available():
    assert not _REASON, _REASON
    assert EMU.supports(torch.device("cpu")) and not EMU.supports(torch.device("meta"))


SIZES = (0, 1, 7, 4097, 2**20 + 3)
EDGE_SIZES = SIZES + (33, 16383, 16384, 16385)  # one chunk is 16384 elements
# Several chunks and a ragged tail without 2^20 elements per input, where a case has many inputs
# (K = 8 and up) or a slow layout: the run time stays low, the kernel paths are the same.
MID_SIZES = (0, 1, 7, 33, 4097, 16383, 16385, 3 * 16384 + 5)
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
LERP_OPS = ("ema_", "swa_", "swa_tensor_n", "swag_")
WRITTEN = ("avg", "sq", "out")
NAN = float("nan")


def _ids(pair: Sequence[torch.dtype]) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


# Layouts: (written base shape, written view, read base shape, read view) for a view of s elements.
# Bases are larger than the views: the spare elements are canaries (written bases are compared whole)
# and, in read bases, NaN sentinels that an over-read would drag into a result.
Layout = Tuple[Callable[[int], tuple], Callable[[Tensor], Tensor], Callable[[int], tuple], Callable[[Tensor], Tensor]]
LAYOUTS: Dict[str, Layout] = {
    # 16-byte aligned starts: the vector path, then the scalar tail
    "contiguous": (lambda s: (s + 8,), lambda t: t[:-8], lambda s: (s + 8,), lambda t: t[:-8]),
    # every operand one element in: the scalar path only
    "offset": (lambda s: (s + 9,), lambda t: t[1:-8], lambda s: (s + 9,), lambda t: t[1:-8]),
    # written operands aligned, read ones not: still the scalar path (all operands must be aligned)
    "offset_reads": (lambda s: (s + 8,), lambda t: t[:-8], lambda s: (s + 9,), lambda t: t[1:-8]),
    # non-contiguous: the bindings run these through contiguous temporaries
    "strided": (lambda s: (s, 2), lambda t: t[:, 1], lambda s: (s, 3), lambda t: t[:, 2]),
    "transposed": (lambda s: (3, s), lambda t: t.t(), lambda s: (3, s), lambda t: t.t()),
}


def rand(shape, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    # float32 draws unless float64 is asked for: several times faster, and the data is as good
    return (torch.randn(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * scale).to(dtype)


def read_base(shape, dtype: torch.dtype, layout: str, scale: float = 1.0) -> Tensor:
    """Random data with NaN sentinels in the elements the layout's read view leaves out."""
    base = rand(shape, dtype, scale)
    if layout in ("contiguous", "offset", "offset_reads"):
        base[-8:] = NAN
        if layout != "contiguous":
            base[0] = NAN
    return base


def draw_weight() -> float:
    """A lerp weight on either side of lerp's 0.5 branch point, or exactly on an edge."""
    return random.choice([random.uniform(0.0, 0.5), random.uniform(0.5, 1.0), 0.5, 1.0, 0.0,
                          random.uniform(0.0, 0.01)])


def make_case(op: str, avg_dtypes: Sequence[torch.dtype], src_dtypes: Sequence[torch.dtype], sizes: Sequence[int],
              layout: str = "contiguous", k: int = 3, alias: Optional[int] = None,
              sq_dtypes: Optional[Sequence[torch.dtype]] = None) -> Dict:
    """Base tensors for `op` (dtypes cycle over positions); the op itself sees the layout's views of them.

    For merges, `alias=j` makes out the very same tensors as inputs[j] (which then take out's dtypes).
    """
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    avg_dt = [avg_dtypes[i % len(avg_dtypes)] for i in range(len(sizes))]
    src_dt = [src_dtypes[i % len(src_dtypes)] for i in range(len(sizes))]
    weights = [random.uniform(-1.0, 1.5) for _ in range(k)]
    weights[-1] = -abs(weights[-1]) - 0.1  # always one negative weight (task arithmetic)
    n = random.randrange(0, 9)
    case: Dict = {"op": op, "layout": layout, "alias": alias, "weights": weights, "weight": draw_weight(),
                  "n": n, "weight_tensor_dtype": random.choice([torch.float64, torch.float32]),
                  "tensor_n": random.random() < 0.5}
    if op == "merge_":
        case["inputs"] = [[read_base(r_shape(s), d, layout) for s, d in zip(sizes, src_dt)] for _ in range(k)]
        if alias is None:  # poisoned: every element the op should write must be written
            case["out"] = [torch.full(w_shape(s), NAN, dtype=d) for s, d in zip(sizes, avg_dt)]
        else:
            case["out"] = [rand(w_shape(s), d) for s, d in zip(sizes, avg_dt)]
            case["inputs"][alias] = case["out"]
        return case
    case["avg"] = [rand(w_shape(s), d) for s, d in zip(sizes, avg_dt)]
    case["src"] = [read_base(r_shape(s), d, layout, scale=2.0) for s, d in zip(sizes, src_dt)]
    if op == "swag_":
        sq_dt = sq_dtypes or avg_dt
        case["sq"] = [(a.double() ** 2 + torch.rand(a.shape, dtype=torch.float64)).to(sq_dt[i % len(sq_dt)])
                      for i, a in enumerate(case["avg"])]
    return case


def copy_case(case: Dict) -> Dict:
    """Fresh copies of the written tensors; read-only ones are shared (checked unchanged afterwards)."""
    c = dict(case)
    for key in WRITTEN:
        if key in case:
            c[key] = [t.clone() for t in case[key]]
    if "inputs" in case:
        c["inputs"] = list(case["inputs"])
        if case["alias"] is not None:
            c["inputs"][case["alias"]] = c["out"]
    return c


def run(case: Dict, backend, found_inf: Optional[Tensor] = None) -> Dict:
    """Apply the case's op through `backend`'s primitive to views of a copy of its tensors; return the copy."""
    c = copy_case(case)
    _, w_view, _, r_view = LAYOUTS[c["layout"]]
    views = {key: [(w_view if key in WRITTEN else r_view)(t) for t in c[key]]
             for key in ("avg", "src", "sq", "out") if key in c}
    op = c["op"]
    if op == "merge_":
        # inputs[alias] gets out's very view objects: a true in-place merge
        inputs = [views["out"] if k == c["alias"] else [r_view(t) for t in x] for k, x in enumerate(c["inputs"])]
        backend.merge_(views["out"], inputs, c["weights"])
        return c
    weight, weight_tensor = c["weight"], None  # ema_: w = 1 - decay, drawn on both sides of 0.5
    if op == "swa_" or (op == "swag_" and not c["tensor_n"]):
        weight = 1.0 / (c["n"] + 1)
    elif op in ("swa_tensor_n", "swag_"):
        # The tensor wins over the float, which is garbage here to prove it.
        weight, weight_tensor = 123.0, torch.tensor(1.0 / (c["n"] + 1), dtype=c["weight_tensor_dtype"])
    if op == "swag_":
        backend.swag_(views["avg"], views["sq"], views["src"], weight, weight_tensor, found_inf)
    else:
        backend.lerp_(views["avg"], views["src"], weight, weight_tensor, found_inf)
    return c


def written(c: Dict) -> List[Tensor]:
    return [t for key in WRITTEN for t in c.get(key, [])]


def read_only(c: Dict) -> List[Tensor]:
    if "inputs" in c:
        return [t for k, x in enumerate(c["inputs"]) if k != c["alias"] for t in x]
    return list(c["src"])


def check_against_reference(case: Dict, found_inf: Optional[Tensor] = None) -> None:
    """Emulated CUDA and reference write the same values (whole bases, so canaries count too);
    read-only inputs stay bit-identical."""
    snapshot = [t.clone() for t in read_only(case)]
    expected = run(case, ref, found_inf)
    actual = run(case, EMU, found_inf)
    for i, (a, e) in enumerate(zip(written(actual), written(expected))):
        atol, rtol = BACKEND_TOLERANCES[a.dtype]
        assert_close(a, e, atol, rtol, f"{case['op']} written[{i}] ({a.dtype}, {tuple(a.shape)})")
    assert_unchanged(snapshot, read_only(actual), f"{case['op']} read-only inputs")


# ---------------------------------------------------------------------------------------------
# The emulation layer itself

def test_launch_rewrite_is_mechanical():
    src = "k<Op><<<static_cast<unsigned int>(blocks), kBlockSize, 0, stream>>>(table, op);\nint x = a >> b;"
    out, count = emu_build.rewrite_launches(src)
    assert count == 1
    assert out == ("k<Op> | ::cuda_emu::launch_config(static_cast<unsigned int>(blocks), kBlockSize, 0, stream)"
                   " | ::cuda_emu::launch_args(table, op);\nint x = a >> b;")


def test_16_bit_conversions_match_torch():
    """The emulated __half/__nv_bfloat16 conversions round like torch (NaN payloads aside)."""
    ops = torch.ops.swm_fused_emu
    all_half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    assert_close(ops._emu_half_to_float(all_half), all_half.view(torch.float16).float(), 0, 0, "half -> float")
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
                          1.5 * 2.0**-24, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), 3.0e38, float("inf"), -float("inf"),
                          NAN, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    random_bits = torch.randint(-2**31, 2**31, (1 << 20,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    scaled = torch.randn(1 << 18, dtype=torch.float64).mul(torch.pow(2.0, torch.randint(-30, 20, (1 << 18,)))).float()
    for x in (edges, random_bits, scaled):
        for name, fn, dtype in (("half", ops._emu_float_to_half, torch.float16),
                                ("bfloat16", ops._emu_float_to_bfloat16, torch.bfloat16)):
            got = fn(x).view(dtype)
            want = x.to(dtype)
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(got), nan), f"float -> {name}: NaN positions differ"
            assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), f"float -> {name} rounding"


def test_empty_tensors_launch_nothing():
    before = EMU.launch_stats()
    EMU.lerp_([torch.empty(0), torch.empty(0, 3)], [torch.empty(0), torch.empty(0, 3)], 0.5, None, None)
    EMU.merge_([torch.empty(0)], [[torch.empty(0)]] * 3, [1.0, 2.0, 3.0])
    assert EMU.launch_stats() == before


def test_many_tensors_take_many_launches_one_block_each():
    before = EMU.launch_stats()
    avgs = [rand((5,), torch.float32) for _ in range(1000)]
    EMU.lerp_(avgs, [a.clone() for a in avgs], 0.5, None, None)
    launches, blocks = (a - b for a, b in zip(EMU.launch_stats(), before))
    assert blocks == 1000 and launches > 1  # a launch's tensor table holds fewer than 1000 tensors


# ---------------------------------------------------------------------------------------------
# Running averages

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("op", LERP_OPS)
def test_lerp_ops_dtype_pairs(op, pair):
    shift = DTYPE_PAIRS.index(pair)
    sq_dtypes = [FLOAT_DTYPES[(i + shift) % 4] for i in range(4)]  # swag: every sq_mean dtype too
    # swa_ runs ema_'s kernel instantiations with another weight: 2^20 + 3 elements once is enough
    sizes = SIZES if op in ("ema_", "swag_") else MID_SIZES
    check_against_reference(make_case(op, [pair[0]], [pair[1]], sizes, sq_dtypes=sq_dtypes))


@pytest.mark.parametrize("layout", ["offset", "offset_reads", "strided", "transposed"])
@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_misaligned_and_non_contiguous(op, layout):
    avg_dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    src_dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32]
    check_against_reference(make_case(op, avg_dtypes, src_dtypes, EDGE_SIZES, layout=layout,
                                      sq_dtypes=[torch.float16, torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_every_dtype_pair_in_one_list(op):
    pairs = DTYPE_PAIRS * 2
    sizes = [random.choice((0, 1, 7, 100, 4097, 16385, 20000)) for _ in pairs]
    check_against_reference(make_case(op, [p[0] for p in pairs], [p[1] for p in pairs], sizes,
                                      sq_dtypes=list(reversed(FLOAT_DTYPES))))


@pytest.mark.parametrize("op", LERP_OPS + ("merge_",))
def test_5000_small_tensors(op):
    sizes = [random.randrange(0, 300) for _ in range(5000)]
    check_against_reference(make_case(op, [torch.float32, torch.bfloat16, torch.float32],
                                      [torch.bfloat16, torch.bfloat16, torch.float16], sizes,
                                      sq_dtypes=[torch.float32, torch.float64]))


@pytest.mark.parametrize("op", ["ema_", "swag_", "merge_"])
def test_float8_sources_are_converted(op):
    """A float8 source (no kernel for it) goes through an exact float32 conversion first."""
    case = make_case(op, [torch.float32, torch.bfloat16, torch.float64], [torch.float32], SIZES)
    key = "inputs" if op == "merge_" else "src"
    if op == "merge_":
        case["inputs"] = [[t.to(torch.float8_e5m2) for t in x] for x in case["inputs"]]
    else:
        case["src"] = [t.to(torch.float8_e4m3fn) for t in case["src"]]
    assert case[key]
    check_against_reference(case)


@pytest.mark.parametrize("flag", [1.0, float("inf"), NAN, -2.0, 0.0], ids=["one", "inf", "nan", "neg", "zero"])
@pytest.mark.parametrize("op", LERP_OPS)
def test_found_inf(op, flag):
    """found_inf != 0 leaves every written tensor bit-identical; 0 runs the update."""
    case = make_case(op, [torch.float32, torch.bfloat16, torch.float64, torch.float16],
                     [torch.bfloat16, torch.float32, torch.float64], SIZES)
    found_inf = torch.tensor(flag, dtype=random.choice([torch.float32, torch.float64]))
    if flag == 0.0:
        check_against_reference(case, found_inf)
    else:
        snapshot = [t.clone() for t in read_only(case)]
        after = run(case, EMU, found_inf)
        assert_unchanged(written(case), written(after), f"{op} with found_inf={flag}")
        assert_unchanged(snapshot, read_only(after), f"{op} read-only inputs")


# ---------------------------------------------------------------------------------------------
# Merges

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 11])
def test_merge_dtype_pairs(k, pair):
    """K = 1..2, 3 and 8 are the three kernel table depths (2, 4, 8); 11 chains two launches."""
    # 2^20 + 3 elements at one K per table depth (1: depth 2, 3: depth 4; depth 8 in the tests below)
    check_against_reference(make_case("merge_", [pair[0]], [pair[1]], SIZES if k in (1, 3) else MID_SIZES, k=k))


@pytest.mark.parametrize("k", [4, 5, 6, 7, 9, 16])
def test_merge_every_dtype_pair_in_one_list(k):
    """The other K, with all 16 dtype pairs at once (the instantiations are those of K = 3 and 8)."""
    sizes = [random.choice((0, 1, 7, 4097, 16385)) for _ in DTYPE_PAIRS] + [2**20 + 3]
    pairs = DTYPE_PAIRS + [random.choice(DTYPE_PAIRS)]
    check_against_reference(make_case("merge_", [p[0] for p in pairs], [p[1] for p in pairs], sizes, k=k))


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("k,alias", [(1, 0), (2, 0), (2, 1), (3, 2), (4, 1), (5, 4), (8, 5), (8, 7), (11, 0),
                                     (11, 9), (17, 16)])
def test_merge_in_place(k, alias, layout):
    """out is inputs[alias]; other inputs have other dtypes at some positions."""
    case = make_case("merge_", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                     [torch.bfloat16, torch.bfloat16, torch.float32], EDGE_SIZES if layout == "contiguous" and k <= 8 else MID_SIZES,
                     layout=layout, k=k, alias=alias)
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
    """NaN sentinels sit just outside every contiguous/offset view: reading one would flag a clean list."""
    _, _, r_shape, r_view = LAYOUTS[layout]
    tensors = [r_view(read_base(r_shape(s), dtype, layout)) for s in EDGE_SIZES]
    if poison != "none":
        candidates = [t for t in tensors if t.numel()]
        if poison == "last":  # the very last element of the largest tensor: the scalar tail of its last chunk
            target = max(candidates, key=Tensor.numel)
            flat_index = target.numel() - 1
        else:
            target = random.choice(candidates)
            flat_index = random.randrange(target.numel())
        value = {"nan": NAN, "inf": float("inf"), "-inf": float("-inf"), "last": NAN}[poison]
        target[tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), target.shape))] = value
    flag = EMU.any_nonfinite(tensors)
    assert flag.shape == () and flag.dtype == torch.float32 and flag.device.type == "cpu"
    assert flag.item() == (0.0 if poison == "none" else 1.0)
    assert flag.item() == ref.any_nonfinite(tensors).item()


@pytest.mark.parametrize("position", ["first", "last", "random"])
def test_any_nonfinite_many_tensors_and_exotic_dtype(position):
    tensors = [rand((random.randrange(0, 200),), random.choice(FLOAT_DTYPES)) for _ in range(5000)]
    assert EMU.any_nonfinite(tensors).item() == 0.0
    with_inf = rand((513,), torch.float32)
    with_inf[511] = float("inf")
    assert EMU.any_nonfinite(tensors + [with_inf.to(torch.float8_e5m2)]).item() == 1.0
    nonempty = [t for t in tensors if t.numel()]
    target = {"first": nonempty[0], "last": nonempty[-1], "random": random.choice(nonempty)}[position]
    target[-1 if position == "last" else random.randrange(target.numel())] = random.choice([NAN, float("-inf")])
    assert EMU.any_nonfinite(tensors).item() == 1.0
    assert EMU.any_nonfinite([]).item() == 0.0 == ref.any_nonfinite([]).item()


# ---------------------------------------------------------------------------------------------
# Block cooperation: fibers, __syncthreads, __shared__, __shfl_down_sync (selftest.cu's kernels)

OPS = torch.ops.swm_fused_emu if not _REASON else None


@pytest.fixture
def schedule():
    """Sets the scheduler's pass order for one test (0 forward, 1 reverse) and restores it afterwards."""
    previous = EMU.set_schedule(0)
    yield EMU.set_schedule
    EMU.set_schedule(previous)


@pytest.mark.parametrize("delta", [0, 1, 2, 5, 16, 31, 32, 2**31 + 1])
def test_shfl_down_sync_semantics(delta):
    """Lane l gets lane l+delta's value, or keeps its own when l+delta >= 32; 2-D blocks, several blocks."""
    blocks, bx, by = 3, 64, 2
    x = torch.arange(blocks * bx * by, dtype=torch.float64) * 1.5 + 0.25
    out, out_int = OPS._emu_shfl(x, blocks, bx, by, delta)
    lane = torch.arange(x.numel()) % 32
    src = torch.where(lane + delta < 32, torch.arange(x.numel()) + (delta if delta < 32 else 0), torch.arange(x.numel()))
    assert torch.equal(out, x[src])
    assert torch.equal(out_int, x[src].long())


@pytest.mark.parametrize("mode", [0, 1], ids=["forward", "reverse"])
@pytest.mark.parametrize("threads", [32, 96, 512, 1024])
def test_syncthreads_orders_shared_memory(threads, mode, schedule):
    """Each thread publishes to __shared__, then reads a neighbour's slot: right in both schedule orders
    with the barriers; without them each order serves some readers stale values (the check can fail)."""
    schedule(mode)
    blocks = 3
    x = torch.randn(blocks * threads)
    t = torch.arange(threads)
    grid = x.view(blocks, threads)
    want = (grid[:, (t + 1) % threads] + 2 * grid[:, (t - 1) % threads]).flatten()
    before = EMU.sync_stats()
    assert torch.equal(OPS._emu_neighbour(x, blocks, threads, True), want)
    assert EMU.sync_stats()[0] - before[0] == 3 * blocks  # three __syncthreads per block
    assert not torch.equal(OPS._emu_neighbour(x, blocks, threads, False), want)


DIVERGENT = {
    0: "divergent __syncthreads() in the kernel taking (int, float*), block (0, 0, 0) of 64 threads: 5 thread(s)"
       " of the scope exited",
    1: "divergent __syncthreads() in the kernel taking (int, float*), block (0, 0, 0) of 64 threads: thread (1, 0, 0)"
       " (warp 0, lane 1) reached selftest.cu:",
    2: "divergent __shfl_down_sync in the kernel taking (int, float*), block (0, 0, 0) of 64 threads: 1 thread(s) of"
       " the scope exited",
    3: "deadlock in the kernel taking (int, float*), block (0, 0, 0) of 64 threads: no thread can run",
    4: "__shfl_down_sync with the full mask at",
}


@pytest.mark.parametrize("mode", sorted(DIVERGENT))
def test_divergent_barriers_fail_with_a_message(mode):
    """A barrier some threads can never reach abandons the launch with a diagnosis instead of hanging
    (a RuntimeError through torch); the next launch runs normally."""
    with pytest.raises(RuntimeError) as raised:
        OPS._emu_divergent(mode)
    message = re.sub(r"\S*/selftest\.cu", "selftest.cu", str(raised.value))
    assert "cuda_emu: " + DIVERGENT[mode] in message, message
    x = torch.randn(2 * 64)
    assert torch.equal(OPS._emu_neighbour(x, 2, 64, True), OPS._emu_neighbour(x, 2, 64, True))
    check_sq_norm([rand((20000,), torch.float32)], [])


# ---------------------------------------------------------------------------------------------
# lerp_multi_

@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_lerp_multi(k):
    """K averages per source (K > 4 takes two fused passes); every dtype at some position, one position
    with a different avg dtype per k (the bindings' unfused path), views with canaries and NaN sentinels."""
    w_shape, w_view, r_shape, r_view = LAYOUTS["contiguous"]
    sizes = list(EDGE_SIZES if k <= 2 else MID_SIZES) + [4097, 7]
    pairs = [DTYPE_PAIRS[(i * 5 + k) % 16] for i in range(len(sizes))]
    avgs = [[rand(w_shape(s), p[0]) for s, p in zip(sizes, pairs)] for _ in range(k)]
    mixed = len(sizes) - 2
    for j in range(k):  # position `mixed` has avg dtypes that differ with k
        avgs[j][mixed] = rand(w_shape(sizes[mixed]), FLOAT_DTYPES[j % 4])
    if k > 1:
        avgs[1][-1] = rand(w_shape(sizes[-1]), torch.float64 if pairs[-1][0] != torch.float64 else torch.float32)
    srcs = [read_base(r_shape(s), p[1], "contiguous", scale=2.0) for s, p in zip(sizes, pairs)]
    weights = [draw_weight() for _ in range(k)]
    src_before = [t.clone() for t in srcs]
    for flag in (None, 0.0, 1.0, NAN):
        found_inf = None if flag is None else torch.tensor(flag, dtype=random.choice([torch.float32, torch.float64]))
        results = []
        for backend in (ref, EMU):
            copies = [[t.clone() for t in x] for x in avgs]
            backend.lerp_multi_([[w_view(t) for t in x] for x in copies], [r_view(t) for t in srcs], weights,
                                found_inf)
            results.append(copies)
        expected, actual = results
        for j in range(k):
            for i, (a, e) in enumerate(zip(actual[j], expected[j])):
                if flag not in (None, 0.0):
                    assert torch.equal(a.view(torch.uint8), avgs[j][i].view(torch.uint8)), f"found_inf={flag} wrote"
                atol, rtol = BACKEND_TOLERANCES[a.dtype]
                assert_close(a, e, atol, rtol, f"lerp_multi_ K={k} avgs[{j}][{i}] ({a.dtype}, found_inf={flag})")
    assert_unchanged(src_before, srcs, "lerp_multi_ sources")


# ---------------------------------------------------------------------------------------------
# sq_norm (the block reduction: __shared__, __shfl_down_sync, __syncthreads)

NORM_SIZES = (0, 1, 7, 4097, 16385, 2**20 + 3)


def _norm_rtol(result: Tensor) -> float:
    # float64 partial sums in another order than torch's: relative 1e-12 on float64 results; float32
    # results are one rounding of nearly the same float64 sum
    return 1e-12 if result.dtype == torch.float64 else 1e-6


def check_sq_norm(tensors: List[Tensor], scale: List[Tensor]) -> Tensor:
    before = [t.clone() for t in tensors + scale]
    got = EMU.sq_norm(tensors, scale)
    want = ref.sq_norm(tensors, scale)
    assert got.dtype == want.dtype and got.shape == () and got.device.type == "cpu"
    assert_close(got, want, 0.0, _norm_rtol(got), f"sq_norm ({got.dtype}, {len(tensors)} tensors)")
    assert_unchanged(before, tensors + scale, "sq_norm inputs")
    return got


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sq_norm_sizes(dtype, scaled):
    """Every size alone and all together; the NaN sentinels past each view must not be read."""
    _, _, r_shape, r_view = LAYOUTS["contiguous"]
    scale_dtypes = [FLOAT_DTYPES[(FLOAT_DTYPES.index(dtype) + i) % 4] for i in range(4)]
    tensors = [r_view(read_base(r_shape(s), dtype, "contiguous", scale=3.0)) for s in NORM_SIZES]
    scale = [r_view(read_base(r_shape(s), scale_dtypes[i % 4], "contiguous")) for i, s in enumerate(NORM_SIZES)]
    for i in range(len(NORM_SIZES)):
        check_sq_norm(tensors[i:i + 1], scale[i:i + 1] if scaled else [])
    check_sq_norm(tensors, scale if scaled else [])


@pytest.mark.parametrize("layout", ["offset", "transposed"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_sq_norm_mixed_dtypes_and_layouts(scaled, layout):
    """All dtypes in one list (float64 result), then without float64 (float32 result); scalar path and
    the bindings' contiguous temporaries."""
    _, _, r_shape, r_view = LAYOUTS[layout]
    sizes = EDGE_SIZES + (3 * 16384 + 5,)
    dts = [FLOAT_DTYPES[i % 4] for i in range(len(sizes))]
    tensors = [r_view(read_base(r_shape(s), d, layout, scale=3.0)) for s, d in zip(sizes, dts)]
    scale = [r_view(read_base(r_shape(s), dts[(i + 1) % len(dts)], layout)) for i, s in enumerate(sizes)]
    assert check_sq_norm(tensors, scale if scaled else []).dtype == torch.float64
    keep = [i for i, d in enumerate(dts) if d != torch.float64]
    assert check_sq_norm([tensors[i] for i in keep], [scale[i] for i in keep] if scaled else []).dtype == torch.float32


def test_sq_norm_thousands_of_tensors_is_deterministic(schedule):
    """3,000 tensors (many launches, one block each): against the reference, and bit for bit the same on a
    rerun and with the scheduler's pass order reversed."""
    sizes = [random.randrange(0, 300) for _ in range(3000)] + [40000]
    no_double = (torch.float32, torch.bfloat16, torch.float16)
    tensors = [rand((s,), no_double[i % 3], scale=3.0) for i, s in enumerate(sizes)]
    scale = [rand((s,), FLOAT_DTYPES[(i + 1) % 4]) for i, s in enumerate(sizes)]
    before = EMU.sync_stats()
    first = check_sq_norm(tensors, scale)
    stats = [a - b for a, b in zip(EMU.sync_stats(), before)]
    blocks = sum((s + 16383) // 16384 for s in sizes)
    assert stats == [blocks, blocks * 16 * 10, blocks * 512]  # per block: 1 __syncthreads, 16 warps x 5 x 2
    assert first.dtype == torch.float32
    again = EMU.sq_norm(tensors, scale)
    schedule(1)
    reversed_order = EMU.sq_norm(tensors, scale)
    assert torch.equal(first.view(torch.int32), again.view(torch.int32))
    assert torch.equal(first.view(torch.int32), reversed_order.view(torch.int32))
    doubles = [t.double() for t in tensors[:500]] + [rand((2**20 + 3,), torch.float64)]
    a = check_sq_norm(doubles, [])
    schedule(0)
    b = EMU.sq_norm(doubles, [])
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))


def test_sq_norm_nonfinite_and_empty():
    x = rand((5000,), torch.float32)
    x[4999] = float("inf")
    assert EMU.sq_norm([x], []).item() == float("inf")
    x[10] = NAN
    assert EMU.sq_norm([rand((7,), torch.float16), x], []).isnan().item()
    assert EMU.sq_norm([torch.empty(0), torch.empty(0, 3)], []).item() == 0.0
    assert EMU.sq_norm([], []).item() == 0.0


# ---------------------------------------------------------------------------------------------
# sam_ascent_

def _ascent_case(sizes, param_dtypes, grad_dtypes, saved_dtypes, layout="contiguous", adaptive=False):
    w_shape, _, r_shape, _ = LAYOUTS[layout]
    pick = lambda dts, i: dts[i % len(dts)]  # noqa: E731
    return {"layout": layout, "adaptive": adaptive,
            "params": [rand(w_shape(s), pick(param_dtypes, i)) for i, s in enumerate(sizes)],
            "grads": [read_base(r_shape(s), pick(grad_dtypes, i), layout, scale=2.0) for i, s in enumerate(sizes)],
            "saved": [torch.full(w_shape(s), NAN, dtype=pick(saved_dtypes, i)) for i, s in enumerate(sizes)],
            "scale": torch.tensor(random.uniform(-0.7, 1.3), dtype=torch.float64).to(
                random.choice([torch.float32, torch.float64]))}


def _run_ascent(case, backend, found_inf):
    _, w_view, _, r_view = LAYOUTS[case["layout"]]
    params, saved = [p.clone() for p in case["params"]], [s.clone() for s in case["saved"]]
    backend.sam_ascent_([w_view(p) for p in params], [r_view(g) for g in case["grads"]], [w_view(s) for s in saved],
                        case["scale"], case["adaptive"], found_inf)
    return params, saved


def check_ascent(case, found_inf=None):
    grads_before = [g.clone() for g in case["grads"]]
    exp_p, exp_s = _run_ascent(case, ref, found_inf)
    act_p, act_s = _run_ascent(case, EMU, found_inf)
    for key, actual, expected in (("params", act_p, exp_p), ("saved", act_s, exp_s)):
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert a.dtype == e.dtype
            if a.dtype in (torch.float32, torch.float64) and (key == "saved" or case["params"][i].dtype == a.dtype):
                # the op's promise for float32/float64 params: the same roundings in the same order, 0 ulps
                assert_unchanged([e], [a], f"sam_ascent_ {key}[{i}] ({a.dtype}) bit for bit")
            atol, rtol = BACKEND_TOLERANCES[e.dtype]
            assert_close(a, e, atol, rtol, f"sam_ascent_ {key}[{i}] ({a.dtype})")
    assert_unchanged(grads_before, case["grads"], "sam_ascent_ grads")
    return act_p, act_s


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_ids)
def test_sam_ascent_dtype_pairs(pair, adaptive):
    """(param, grad) dtype pairs, saved in every dtype across positions."""
    saved = [FLOAT_DTYPES[(i + DTYPE_PAIRS.index(pair)) % 4] for i in range(4)]
    sizes = SIZES if pair[0] == pair[1] else MID_SIZES
    check_ascent(_ascent_case(sizes, [pair[0]], [pair[1]], [pair[0]] + saved, adaptive=adaptive))


@pytest.mark.parametrize("layout", ["offset", "strided"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_ascent_layouts_and_found_inf(adaptive, layout):
    """Scalar path and temporaries; found_inf != 0 leaves params bit-identical but still writes saved."""
    case = _ascent_case(EDGE_SIZES, FLOAT_DTYPES, list(reversed(FLOAT_DTYPES)),
                        [torch.float32, torch.float64, torch.float16], layout=layout, adaptive=adaptive)
    check_ascent(case, torch.tensor(0.0))
    for flag in (1.0, float("inf"), NAN):
        params, saved = check_ascent(case, torch.tensor(flag, dtype=random.choice([torch.float32, torch.float64])))
        assert_unchanged(case["params"], params, f"sam_ascent_ params with found_inf={flag}")
