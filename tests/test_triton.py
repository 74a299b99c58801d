"""Triton-specific paths: launch tables, one launch per dtype group, bf16 rounding, and every
primitive against the reference backend on fresh random data.

Runs through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py when
there is no GPU), or on CUDA tensors when a GPU is present and the interpreter is off.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import List

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused import FlatBuffer, use_backend
from swm_fused.backends import reference
from _cases import OPS, compare_to_reference, make_case
from _helpers import BACKEND_TOLERANCES, FLOAT_DTYPES, assert_close, clones

import swm_fused.triton as triton_backend  # noqa: I100  (after conftest.py has set TRITON_INTERPRET)

if triton_backend.unavailable_reason():
    pytest.skip(f"triton backend unavailable: {triton_backend.unavailable_reason()}", allow_module_level=True)

import triton  # noqa: E402
from swm_fused.triton import _multi_tensor  # noqa: E402
from swm_fused.triton import lerp as lerp_module, merge as merge_module, swag as swag_module  # noqa: E402

# The package attribute `any_nonfinite` is the primitive; its module of the same name lives in sys.modules.
any_nonfinite_module = sys.modules["swm_fused.triton.any_nonfinite"]

DEVICE = torch.device("cpu" if _multi_tensor.INTERPRETED else "cuda")
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))
SIZES = (0, 1, 7, 4097)


def _id(pair) -> str:
    return "-".join(str(d).replace("torch.", "") for d in pair)


def rand(n: int, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    return (torch.randn(n, dtype=torch.float64, device=DEVICE) * scale).to(dtype)


# Compiled kernels and Triton >= 3.9's interpreter fuse multiply-adds exactly like torch; older
# interpreters emulate tl.fma as a multiply then an add (two roundings), one ulp off at times.
EXACT = not _multi_tensor.INTERPRETED or tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)


def assert_same(actual: List[Tensor], expected: List[Tensor], what: str) -> None:
    """Bit-for-bit agreement with the reference (NaN positions compared, payloads not)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype
        atol, rtol = (0.0, 0.0) if EXACT else BACKEND_TOLERANCES[e.dtype]
        assert_close(a, e, atol=atol, rtol=rtol, what=f"{what} tensor {i} ({a.dtype})")


class CountingKernel:
    """Stands in for a @triton.jit kernel and counts launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """Replace every kernel with a counter; returns {primitive name: CountingKernel}."""
    counters = {}
    for name, module, attr in [("lerp_", lerp_module, "_lerp_kernel"), ("swag_", swag_module, "_swag_kernel"),
                               ("merge_", merge_module, "_merge_kernel"),
                               ("any_nonfinite", any_nonfinite_module, "_any_nonfinite_kernel")]:
        counters[name] = CountingKernel(getattr(module, attr))
        monkeypatch.setattr(module, attr, counters[name])
    return counters


# ---------------------------------------------------------------------------------------------
# Tables

def test_tables_cover_every_element_once():
    sizes = [int(s) for s in torch.randint(1, 3000, (40,))] + [4097, 1]
    avgs = [rand(n, torch.float32) for n in sizes]
    srcs = [rand(n, torch.bfloat16) for n in sizes]
    launch = _multi_tensor.build_launch([avgs, srcs], extras=[7, -3])
    block = launch.block
    assert block & (block - 1) == 0 and _multi_tensor.MIN_BLOCK <= block <= _multi_tensor.TILE
    assert launch.rows * block == _multi_tensor.TILE
    assert launch.grid == ((launch.n_chunks + launch.rows - 1) // launch.rows,)

    table = launch.tensor_table.cpu().view(len(sizes), 3)
    assert table[:, 0].tolist() == [t.data_ptr() for t in avgs]
    assert table[:, 1].tolist() == [t.data_ptr() for t in srcs]
    assert table[:, 2].tolist() == sizes
    assert launch.extras.cpu().tolist() == [7, -3]

    entries = launch.chunk_table.cpu()
    assert entries.numel() == launch.n_chunks == sum(-(-n // block) for n in sizes)
    tensor, chunk = (entries >> 32).tolist(), (entries & 0xFFFFFFFF).tolist()
    expected = [(i, j) for i, n in enumerate(sizes) for j in range(-(-n // block))]
    assert list(zip(tensor, chunk)) == expected
    for t in (launch.tensor_table, launch.chunk_table, launch.extras):
        assert t.data_ptr() % 16 == 0 and t.device == DEVICE
    assert not launch.aligned  # 4097 elements: no alignment hints


def test_only_aligned_groups_get_alignment_hints():
    flat = FlatBuffer.from_tensors([rand(n, torch.float32) for n in (3, 4097, 16)])
    assert _multi_tensor.build_launch([flat.storages]).aligned
    assert _multi_tensor.build_launch([flat.views]).aligned is False  # view sizes 3 and 4097
    padded = [rand(32, torch.float32), rand(48, torch.float32)]
    assert _multi_tensor.build_launch([padded]).aligned
    assert _multi_tensor.build_launch([[padded[0][2:18], padded[1][:16]]]).aligned is False  # 8-byte offset


def test_block_size_keeps_padding_small():
    many_small = [rand(100, torch.float32) for _ in range(50)]
    one_large = [rand(1 << 20, torch.float32)]
    small = _multi_tensor.build_launch([many_small])
    large = _multi_tensor.build_launch([one_large])
    assert small.block <= 100 // 4 or small.block == _multi_tensor.MIN_BLOCK
    assert small.n_chunks * small.block <= 1.25 * 50 * 100 + 50 * _multi_tensor.MIN_BLOCK
    assert large.block == _multi_tensor.TILE


def test_tables_are_cached_by_content():
    avgs = [rand(n, torch.float32) for n in (5, 70)]
    srcs = [rand(n, torch.float16) for n in (5, 70)]
    first = _multi_tensor.build_launch([avgs, srcs], extras=[1])
    assert _multi_tensor.build_launch([avgs, srcs], extras=[1]) is first
    assert _multi_tensor.build_launch([avgs, srcs], extras=[2]) is not first
    assert _multi_tensor.build_launch([srcs, avgs], extras=[1]) is not first
    other = [rand(n, torch.float32) for n in (5, 70)]
    assert _multi_tensor.build_launch([other, srcs], extras=[1]) is not first


def test_group_positions_splits_by_dtype_and_skips_empty():
    dts = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float32]
    avgs = [rand(n, d) for n, d in zip((3, 4, 0, 5, 6), dts)]
    srcs = [rand(n, d) for n, d in zip((3, 4, 0, 5, 6), [torch.float16] * 4 + [torch.float32])]
    groups = _multi_tensor.group_positions([avgs, srcs])
    assert groups == {(torch.float32, torch.float16): [0], (torch.bfloat16, torch.float16): [1],
                      (torch.float64, torch.float16): [3], (torch.float32, torch.float32): [4]}


# ---------------------------------------------------------------------------------------------
# Primitives against the reference, bit for bit

@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_id)
@pytest.mark.parametrize("op", OPS)
def test_bit_for_bit_with_the_reference(op, pair):
    """The shared cases (tests/_cases.py), with no tolerance: same formula, same roundings."""
    for found_inf, n_as_tensor in [(None, False), (torch.zeros((), device=DEVICE), True),
                                   (torch.ones((), device=DEVICE), False)]:
        case = make_case(op, SIZES, [pair[0]], [pair[1]], device=DEVICE)
        compare_to_reference(case, "triton", found_inf=found_inf, n_as_tensor=n_as_tensor, exact=EXACT)


@pytest.mark.parametrize("pair", [(torch.float32, torch.bfloat16), (torch.float32, torch.float64),
                                  (torch.float64, torch.float32)], ids=_id)
def test_swag_with_mean_and_sq_mean_of_different_dtypes(pair):
    """Each moment is computed in its own compute type, as the reference does."""
    mean_dtype, sq_dtype = pair
    for src_dtype in (torch.float64, torch.float16):
        means = [rand(n, mean_dtype) for n in SIZES]
        sq_means = [(m.double() ** 2).to(sq_dtype) for m in means]
        srcs = [rand(n, src_dtype, scale=3.0) for n in SIZES]
        expected_means, expected_sq = clones(means), clones(sq_means)
        reference.swag_(expected_means, expected_sq, srcs, 0.2, None, None)
        triton_backend.swag_(means, sq_means, srcs, 0.2, None, None)
        assert_same(means + sq_means, expected_means + expected_sq, f"swag_ {pair} from {src_dtype}")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_merge_with_a_different_dtype_per_model(k, out_dtype):
    case = make_case("merge_", SIZES, [out_dtype], [torch.float32], k=k, device=DEVICE)
    case["inputs"] = [[t.to(FLOAT_DTYPES[(j + 1) % 4]) for t in x] for j, x in enumerate(case["inputs"])]
    compare_to_reference(case, "triton", exact=EXACT)


def test_merge_handles_many_models_in_one_launch(launches):
    k = 20
    inputs = [[rand(n, torch.float32) for n in (33, 1000)] for _ in range(k)]
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64).tolist()
    outs = [torch.full((n,), float("nan"), device=DEVICE) for n in (33, 1000)]
    expected = clones(outs)
    reference.merge_(expected, inputs, weights)
    triton_backend.merge_(outs, inputs, weights)
    assert launches["merge_"].launches == 1
    assert_same(outs, expected, "merge_ K=20")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_nonfinite_finds_one_bad_element(dtype, bad):
    tensors = [rand(n, d) for n, d in zip((4097, 1, 7, 0, 300, 50), FLOAT_DTYPES + (dtype, dtype))]
    flag = triton_backend.any_nonfinite(tensors)
    assert flag.shape == () and flag.dtype == torch.float32 and flag.device == DEVICE
    assert flag.item() == 0.0 == reference.any_nonfinite(tensors).item()
    target = [i for i, t in enumerate(tensors) if t.dtype == dtype and t.numel()]
    victim = tensors[target[int(torch.randint(len(target), ()))]]
    victim[int(torch.randint(victim.numel(), ()))] = bad
    assert triton_backend.any_nonfinite(tensors).item() == 1.0 == reference.any_nonfinite(tensors).item()


def test_any_nonfinite_ignores_largest_finite_values():
    tensors = [torch.tensor([torch.finfo(d).max, -torch.finfo(d).max, torch.finfo(d).tiny], dtype=d, device=DEVICE)
               for d in FLOAT_DTYPES]
    assert triton_backend.any_nonfinite(tensors).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Launch counts: one per dtype group, whatever the number of tensors

def test_many_tensors_take_one_launch_per_dtype_group(launches):
    sizes = [int(s) for s in torch.randint(1, 200, (5000,))]
    avg_dtypes = [torch.float32 if i % 3 else torch.bfloat16 for i in range(len(sizes))]
    avgs = [rand(n, d) for n, d in zip(sizes, avg_dtypes)]
    srcs = [rand(n, torch.bfloat16) for n in sizes]
    expected = clones(avgs)
    reference.lerp_(expected, srcs, 0.01, None, None)
    triton_backend.lerp_(avgs, srcs, 0.01, None, None)
    assert launches["lerp_"].launches == 2  # (fp32, bf16) and (bf16, bf16)
    assert_same(avgs, expected, "lerp_ over 5000 tensors")

    sq = [(a.double() ** 2).to(a.dtype) for a in avgs]
    expected_sq, expected_mean = clones(sq), clones(avgs)
    reference.swag_(expected_mean, expected_sq, srcs, 0.5, None, None)
    triton_backend.swag_(avgs, sq, srcs, 0.5, None, None)
    assert launches["swag_"].launches == 2
    assert_same(avgs + sq, expected_mean + expected_sq, "swag_ over 5000 tensors")

    outs = [torch.full_like(a, float("nan")) for a in avgs]
    expected_outs = clones(outs)
    reference.merge_(expected_outs, [avgs, srcs, sq], [0.5, 0.7, -0.2])
    triton_backend.merge_(outs, [avgs, srcs, sq], [0.5, 0.7, -0.2])
    assert launches["merge_"].launches == 2
    assert_same(outs, expected_outs, "merge_ over 5000 tensors")

    assert triton_backend.any_nonfinite(avgs + srcs).item() == 0.0
    assert launches["any_nonfinite"].launches == 2  # float32 and bfloat16


def test_every_dtype_pair_in_one_list_launches_once_per_pair(launches):
    avgs = [rand(n, a) for n, (a, _) in zip(itertools.cycle((5, 300)), DTYPE_PAIRS * 2)]
    srcs = [rand(n, s) for n, (_, s) in zip(itertools.cycle((5, 300)), DTYPE_PAIRS * 2)]
    expected = clones(avgs)
    reference.lerp_(expected, srcs, 0.7, None, None)
    triton_backend.lerp_(avgs, srcs, 0.7, None, None)
    assert launches["lerp_"].launches == len(DTYPE_PAIRS)
    assert_same(avgs, expected, "lerp_ with every dtype pair in one list")


def test_empty_tensors_launch_nothing(launches):
    avgs, srcs = [rand(0, torch.float32)] * 3, [rand(0, torch.float16)] * 3
    triton_backend.lerp_(avgs, srcs, 0.5, None, None)
    assert triton_backend.any_nonfinite(avgs).item() == 0.0
    assert launches["lerp_"].launches == 0 and launches["any_nonfinite"].launches == 0


def test_flatbuffer_storages_take_one_launch_each(launches):
    shapes = [(31, 7), (4097,), (1,), (3, 3, 3)]
    avgs = [torch.randn(s, device=DEVICE) for s in shapes]
    srcs = [torch.randn(s, device=DEVICE).to(torch.bfloat16) for s in shapes]
    avg_flat, src_flat = FlatBuffer.from_tensors(avgs), FlatBuffer.from_tensors(srcs)
    expected = clones(avgs)
    reference.lerp_(expected, srcs, 0.125, None, None)
    with use_backend("triton"):
        swm_fused.ema_(avg_flat, src_flat, 0.875)
    assert launches["lerp_"].launches == 1
    assert_same(avg_flat.views, expected, "ema_ on FlatBuffers")


# ---------------------------------------------------------------------------------------------
# Layout and rounding

def test_non_contiguous_tensors_go_through_temporaries():
    base_avg = rand(40 * 30, torch.float32).view(40, 30)
    base_sq = rand(40 * 30, torch.bfloat16).view(40, 30)
    src = rand(40 * 30, torch.float16).view(40, 30).t()  # column-major source
    avg_view, sq_view = base_avg.t()[::2], base_sq.t()[::2]  # strided outputs
    untouched_avg, untouched_sq = base_avg.clone(), base_sq.clone()
    expected_avg, expected_sq = avg_view.clone(), sq_view.clone()
    reference.swag_([expected_avg], [expected_sq], [src[::2]], 0.3, None, None)
    triton_backend.swag_([avg_view], [sq_view], [src[::2]], 0.3, None, None)
    assert_same([avg_view, sq_view], [expected_avg, expected_sq], "strided swag_")
    # Elements outside the views are left alone.
    outside = torch.ones(30, 40, dtype=torch.bool, device=DEVICE)
    outside[::2] = False
    assert torch.equal(base_avg.t()[outside], untouched_avg.t()[outside])
    assert torch.equal(base_sq.t()[outside].float(), untouched_sq.t()[outside].float())


def test_non_contiguous_in_place_merge():
    base = rand(20 * 12, torch.float32).view(20, 12)
    out = base.t()  # non-contiguous, and also input 1
    inputs = [[rand(12 * 20, torch.bfloat16).view(12, 20)], [out], [rand(12 * 20, torch.float64).view(12, 20)]]
    weights = [0.5, -1.25, 0.75]
    expected = [torch.empty_like(out)]
    reference.merge_(expected, inputs, weights)
    triton_backend.merge_([out], inputs, weights)
    assert_same([out], expected, "non-contiguous in-place merge_")


def test_bfloat16_store_rounds_to_nearest_even():
    """Ties, near-ties, subnormals, overflow to Inf, Inf, NaN, -0: as torch's float32 -> bfloat16 cast."""
    patterns = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00008000, 0x00018000,
                             0x7F7FFFFF, 0xFF7F8000, 0x7F800000, 0x7FC00000, 0x80000000], dtype=torch.int64)
    special = patterns.to(torch.int32).view(torch.float32)
    src = torch.cat([special, torch.randn(4000, dtype=torch.float32)]).to(DEVICE)
    out = torch.zeros(src.numel(), dtype=torch.bfloat16, device=DEVICE)
    triton_backend.merge_([out], [[src]], [1.0])  # 1.0 * src is exact: only the store rounds
    expected = src.to(torch.bfloat16)
    assert_close(out, expected, atol=0.0, rtol=0.0, what="bf16 rounding")
    finite = ~torch.isnan(src)  # NaN payloads may differ; every other bit pattern must not (-0 included)
    assert torch.equal(out.view(torch.int16)[finite], expected.view(torch.int16)[finite])


def test_bfloat16_loads_are_exact():
    patterns = torch.tensor([0x0001, 0x8001, 0x007F, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x3F80, 0x8000],
                            dtype=torch.int32)
    special = patterns.to(torch.int16).view(torch.bfloat16)
    src = torch.cat([special, torch.randn(100, dtype=torch.bfloat16)]).to(DEVICE)
    for dtype in (torch.float32, torch.float64):
        out = torch.full((src.numel(),), float("nan"), dtype=dtype, device=DEVICE)
        triton_backend.merge_([out], [[src]], [1.0])
        assert_close(out, src.to(dtype), atol=0.0, rtol=0.0, what=f"bf16 -> {dtype}")
        assert torch.equal(torch.signbit(out), torch.signbit(src.to(dtype)))


# ---------------------------------------------------------------------------------------------
# Availability

def test_supports_the_device_it_runs_on():
    assert triton_backend.unavailable_reason() == ""
    backend = swm_fused.dispatch.get_backend("triton")
    assert backend.supports(DEVICE)
    assert not backend.supports(torch.device("cuda" if DEVICE.type == "cpu" else "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_interpreter_and_cuda_it_says_why():
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = "import swm_fused.triton as t; print(t.unavailable_reason())"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"


_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from swm_fused.triton import _multi_tensor, lerp, merge, swag
# modules that share their name with the function the package exports
anf, merge_sparse, sam_ascent, sq_norm = (importlib.import_module(f"swm_fused.triton.{m}")
                                          for m in ("any_nonfinite", "merge_sparse", "sam_ascent", "sq_norm"))
assert not _multi_tensor.INTERPRETED
tables = {"tensor_table": "*i64", "chunk_table": "*i64", "n_chunks": "i32"}
flags = {"weight_bits": "i64", "weight_ptr": "*fp64", "found_inf_ptr": "*fp32"}
f32, f64, bf16 = tl.float32, tl.float64, tl.bfloat16
tile = dict(ROWS=1, BLOCK=4096)
variants = {
    "lerp": (lerp._lerp_kernel, flags, dict(AVG=f32, SRC=bf16, COMPUTE=f32, HAS_WEIGHT_TENSOR=True,
                                            HAS_FOUND_INF=True, ALIGNED=False, **tile)),
    "lerp_aligned": (lerp._lerp_kernel, flags, dict(AVG=bf16, SRC=f32, COMPUTE=f32, HAS_WEIGHT_TENSOR=False,
                                                    HAS_FOUND_INF=False, ALIGNED=True, **tile)),
    "swag_aligned": (swag._swag_kernel, flags, dict(MEAN=f64, SQ_MEAN=f32, SRC=bf16, MEAN_COMPUTE=f64,
                                                    SQ_COMPUTE=f32, SRC_COMPUTE=f64, HAS_WEIGHT_TENSOR=True,
                                                    HAS_FOUND_INF=True, ALIGNED=True, **tile)),
    "merge_aligned": (merge._merge_kernel, {"extras": "*i64"}, dict(K=3, OUT=bf16, COMPUTE=f32, ALIGNED=True,
                                                                    **tile)),
    "any_nonfinite": (anf._any_nonfinite_kernel, {"flag_ptr": "*fp32"},
                      dict(BITS=tl.int64, EXPONENT=0x7FF0000000000000, ROWS=32, BLOCK=128, ALIGNED=False)),
    "lerp_multi": (lerp._lerp_multi_kernel, {"extras": "*i64", "found_inf_ptr": "*fp32"},
                   dict(K=3, AVG=f32, SRC=bf16, COMPUTE=f32, HAS_FOUND_INF=True, ALIGNED=True, **tile)),
    "sq_norm": (sq_norm._sq_norm_kernel, {"partials_ptr": "*fp64"},
                dict(X=bf16, S=f32, COMPUTE=f32, HAS_SCALE=True, ROW_WIDTH=3, ALIGNED=True, **tile)),
    "sam_ascent": (sam_ascent._sam_ascent_kernel, {"scale_ptr": "*fp32", "found_inf_ptr": "*fp32"},
                   dict(PARAM=bf16, GRAD=f32, SAVED=bf16, COMPUTE=f32, ADAPTIVE=True, HAS_FOUND_INF=True,
                        ALIGNED=True, **tile)),
    "sam_ascent_fp64": (sam_ascent._sam_ascent_kernel, {"scale_ptr": "*fp64", "found_inf_ptr": "*fp32"},
                        dict(PARAM=f64, GRAD=f64, SAVED=f32, COMPUTE=f64, ADAPTIVE=False, HAS_FOUND_INF=False,
                             ALIGNED=False, **tile)),
    **{f"ties_{election}": (merge_sparse._ties_kernel, {"extras": "*i64"},
                            dict(K=3, ELECTION=election, NORMALIZE=True, HAS_BASE=True, SUBTRACT=True, BANDED=True,
                                 OUT=bf16, BASE=bf16, COMPUTE=f32, ALIGNED=True, **tile))
       for election in (0, 1, 2)},
    "ties_fp64": (merge_sparse._ties_kernel, {"extras": "*i64"},
                  dict(K=2, ELECTION=0, NORMALIZE=False, HAS_BASE=False, SUBTRACT=False, BANDED=False,
                       OUT=f32, BASE=f32, COMPUTE=f64, ALIGNED=False, **tile)),
    "dare_drop": (merge_sparse._drop_kernel, {"extras": "*i64"},
                  dict(DELTA=bf16, U=f32, P=f64, PER_ELEMENT=True, RESCALE=True, ALIGNED=True, **tile)),
    "dare_drop_scalar": (merge_sparse._drop_kernel, {"extras": "*i64"},
                         dict(DELTA=f32, U=f32, P=f32, PER_ELEMENT=False, RESCALE=False, ALIGNED=False, **tile)),
}
ptx = {}
for name, (kernel, signature, constexprs) in variants.items():
    signature = {**tables, **signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(_multi_tensor.LAUNCH_OPTIONS))
    ptx[name] = compiled.asm["ptx"]
json.dump({name: {"fma": p.count("fma.rn"), "vector_loads": p.count("ld.global.v")} for name, p in ptx.items()},
          sys.stdout)
"""


def test_kernels_compile_for_hopper():
    """The interpreter checks no GPU typing rules, so compile every kernel (several variants of the newer
    ones) for sm_90 with Triton's own ptxas, no GPU needed: torch's fma lerp survives, merges fuse nothing,
    aligned groups vectorise."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout)
    assert counts["lerp"]["fma"] > 0 and counts["lerp_aligned"]["fma"] > 0 and counts["swag_aligned"]["fma"] > 0
    for name in ("merge_aligned", "sq_norm", "sam_ascent", "ties_0", "ties_1", "ties_2", "dare_drop"):
        assert counts[name]["fma"] == 0, name  # a multiply then an add, rounded twice, as the reference does
    for name in ("lerp_aligned", "swag_aligned", "merge_aligned", "lerp_multi", "sq_norm", "sam_ascent", "ties_0",
                 "dare_drop"):
        assert counts[name]["vector_loads"] > 0, name
