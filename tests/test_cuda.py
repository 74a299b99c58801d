"""What only the cuda backend does, on a GPU, against the reference backend (the shared cases of
tests/test_ops.py run there too, on the cuda, triton and reference rows of every CUDA device):
source dtypes without a kernel (float8), every dtype pair in one list, merge inputs of mixed dtypes
at one position, and that nothing synchronises with the host. Skips without CUDA or the CUDA kernels.
"""
from __future__ import annotations

import itertools
import random
from typing import List

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused import dispatch, use_backend

_UNAVAILABLE = dispatch.backend_status()["cuda"]
if _UNAVAILABLE:
    pytest.skip(f"cuda backend unavailable: {_UNAVAILABLE}", allow_module_level=True)

from _cases import OPS, compare_to_reference, make_case  # noqa: E402
from _helpers import BACKEND_TOLERANCES, FLOAT_DTYPES, assert_close  # noqa: E402

DEVICE = torch.device("cuda")
SIZES = (0, 1, 7, 4097, 2**20 + 3)
DTYPE_PAIRS = list(itertools.product(FLOAT_DTYPES, FLOAT_DTYPES))


@pytest.mark.parametrize("op", OPS)
def test_every_dtype_pair_in_one_list(op):
    pairs = DTYPE_PAIRS * 2
    sizes = [random.choice((0, 1, 7, 100, 4097, 20000)) for _ in pairs]
    compare_to_reference(make_case(op, sizes, [p[0] for p in pairs], [p[1] for p in pairs], device=DEVICE), "cuda")


def test_source_dtype_without_kernel_is_converted():
    """A float8 source goes through an exact float32 conversion first."""
    case = make_case("ema_", SIZES, [torch.float32, torch.bfloat16], [torch.float32], device=DEVICE)
    case["src"] = [t.to(torch.float8_e5m2) for t in case["src"]]
    compare_to_reference(case, "cuda")


def test_merge_mixed_input_dtypes_at_one_position():
    """Inputs of one position with different dtypes (each converted to the compute type first)."""
    case = make_case("merge_", (4097, 7, 2**20 + 3), [torch.float32, torch.bfloat16, torch.float64],
                     [torch.float32], k=4, device=DEVICE)
    mixes = [torch.bfloat16, torch.float16, torch.float64, torch.float32]
    case["inputs"] = [[t.to(mixes[(k + i) % 4]) for i, t in enumerate(x)] for k, x in enumerate(case["inputs"])]
    compare_to_reference(case, "cuda")


def test_any_nonfinite_many_tensors_and_exotic_dtype():
    tensors = [torch.randn(random.randrange(0, 200), device=DEVICE).to(random.choice(FLOAT_DTYPES))
               for _ in range(5000)]
    with_inf = torch.randn(513, device=DEVICE)
    with_inf[511] = float("inf")
    with use_backend("cuda"):
        assert swm_fused.any_nonfinite(tensors).item() == 0.0
        assert swm_fused.any_nonfinite(tensors + [with_inf.to(torch.float8_e5m2)]).item() == 1.0
        last_nonempty = [t for t in tensors if t.numel()][-1]
        last_nonempty[-1] = float("nan")
        assert swm_fused.any_nonfinite(tensors).item() == 1.0


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_no_host_sync(backend):
    """found_inf, n_averaged and the any_nonfinite flag stay on the device: the GPU never syncs."""
    if dispatch.backend_status()[backend]:
        pytest.skip(dispatch.backend_status()[backend])
    sizes = (4097, 7, 1, 2**20 + 3)
    avgs = [torch.randn(s, device=DEVICE) for s in sizes]
    sqs = [a * a for a in avgs]
    srcs = [torch.randn(s, device=DEVICE).bfloat16() for s in sizes]
    outs = [torch.full((s,), float("nan"), dtype=torch.bfloat16, device=DEVICE) for s in sizes]

    def sequence(name: str, sync_mode: str) -> List[Tensor]:
        a, q, s, o = ([t.clone() for t in x] for x in (avgs, sqs, srcs, outs))
        s_bad = [t.clone() for t in s]
        s_bad[1][3] = float("nan")
        n = torch.tensor(3, device=DEVICE)
        with use_backend(name):  # warm-up: first calls may build and upload launch tables (and pin host memory)
            swm_fused.merge_([t.clone() for t in o], [a, s, q], [0.5, -0.25, 0.125])
            swm_fused.ties_merge_([t.clone() for t in o], [a, s], [0.5, 0.5], base=q)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            with use_backend(name):
                flag = swm_fused.any_nonfinite(s)
                swm_fused.ema_(a, s, 0.9, found_inf=flag)
                swm_fused.swa_(a, s, n, found_inf=flag)
                swm_fused.swag_(a, q, s, n, found_inf=flag)
                swm_fused.merge_(o, [a, s, q], [0.5, -0.25, 0.125])
                saved = [torch.empty_like(t) for t in a]  # SAM: norm, ascent and restore, all on the device
                norm = swm_fused.sq_norm(s, scale=a)
                swm_fused.sam_ascent_(a, s, saved, 0.05 / (norm.sqrt() + 1e-12), adaptive=True, found_inf=flag)
                swm_fused.sam_ascent_(q, s, saved, 0.05 / (swm_fused.sq_norm(s).sqrt() + 1e-12))
                swm_fused.merge_(q, [saved], [1.0])
                bands = torch.rand(2, len(sizes), 2, dtype=torch.float64, device=DEVICE)  # the merge ops
                swm_fused.ties_merge_(o, [a, s], [0.7, -0.3], base=q, thresholds=bands, normalize=True)
                swm_fused.dare_drop_(q, [torch.rand_like(t) for t in q], 0.3)
                flag = swm_fused.any_nonfinite(s_bad)  # a NaN: these steps must be skipped, still without a sync
                swm_fused.ema_(a, s_bad, 0.5, found_inf=flag)
                swm_fused.swag_(a, q, s_bad, n, found_inf=flag)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return a + q + o + [norm.reshape(1)]

    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is live: a real sync raises
            torch.ones(1, device=DEVICE).item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    actual = sequence(backend, "error")
    expected = sequence("reference", "default")
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, *BACKEND_TOLERANCES[a.dtype], f"no-sync sequence result {i}")


def test_tune_times_both_backends_and_sets_the_automatic_choice():
    times = swm_fused.tune(numel=1 << 20, repeats=3)
    assert set(times) <= {"cuda", "triton"} and "cuda" in times
    assert dispatch.select(DEVICE).name == min(times, key=times.__getitem__)
    dispatch._tuned_cuda.clear()
    assert dispatch.select(DEVICE).name == "cuda"
