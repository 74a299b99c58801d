"""The C++ ops as torch.library ops: opcheck, torch.compile(fullgraph=True), and op-level checks.

Skips when the extension is not built. torch.compile uses backend="aot_eager": it traces
through fake kernels and functionalizes the mutations exactly as inductor would, without
inductor's slow C++ code generation.
"""
from __future__ import annotations

from typing import List

import pytest
import torch
from torch import Tensor

from swm_fused import dispatch
from _helpers import FLOAT_DTYPES, random_tensor

if dispatch.backend_status()["cpp"]:
    pytest.skip(f"cpp backend unavailable: {dispatch.backend_status()['cpp']}", allow_module_level=True)

OPS = torch.ops.swm_fused
SHAPES = [(3, 5), (7,), (), (0,), (33, 2)]


def _mixed(dtype_offset: int) -> List[Tensor]:
    """Random tensors of SHAPES, their dtypes cycling through every kernel dtype."""
    return [random_tensor(s, FLOAT_DTYPES[(i + dtype_offset) % 4]) for i, s in enumerate(SHAPES)]


def _flags():
    """(weight_tensor, found_inf) variants: plain float weight, device weight, flag unset and set."""
    weight = torch.rand((), dtype=torch.float64)
    return [(None, None), (weight, None), (weight, torch.zeros(())), (None, torch.ones(()))]


def _clones(tensors: List[Tensor]) -> List[Tensor]:
    return [t.clone() for t in tensors]


KERNEL_OPS = ["lerp_", "lerp_multi_", "swag_", "merge_", "any_nonfinite", "ties_merge_", "dare_drop_"]


@pytest.mark.parametrize("ops", KERNEL_OPS)
def test_every_op_has_a_cpu_kernel(ops):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::{ops}", "CPU")


@pytest.mark.parametrize("flags", range(4))
def test_opcheck_lerp(flags):
    weight_tensor, found_inf = _flags()[flags]
    weight = torch.rand(()).item()
    torch.library.opcheck(OPS.lerp_.default, (_mixed(0), _mixed(1), weight, weight_tensor, found_inf))


@pytest.mark.parametrize("flags", range(4))
def test_opcheck_swag(flags):
    weight_tensor, found_inf = _flags()[flags]
    weight = torch.rand(()).item()
    sq_means = [t.abs() for t in _mixed(2)]
    torch.library.opcheck(OPS.swag_.default, (_mixed(0), sq_means, _mixed(3), weight, weight_tensor, found_inf))


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
@pytest.mark.parametrize("k", [1, 3])
def test_opcheck_lerp_multi(k, found_inf):
    avgs = [t for j in range(k) for t in _mixed(j)]  # k-major
    weights = torch.rand(k, dtype=torch.float64).tolist()
    flag = None if found_inf is None else torch.tensor(found_inf)
    torch.library.opcheck(OPS.lerp_multi_.default, (avgs, _mixed(2), weights, flag))


@pytest.mark.parametrize("k", [1, 3])
def test_opcheck_merge(k):
    outs = [torch.full(s, float("nan")).to(FLOAT_DTYPES[i % 4]) for i, s in enumerate(SHAPES)]
    inputs = [t for j in range(k) for t in _mixed(j + 1)]  # k-major
    weights = (torch.randn(k, dtype=torch.float64)).tolist()
    torch.library.opcheck(OPS.merge_.default, (outs, inputs, weights))


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_opcheck_any_nonfinite(poison):
    tensors = _mixed(0)
    if poison is not None:
        tensors[4].view(-1)[-1] = poison
    torch.library.opcheck(OPS.any_nonfinite.default, (tensors,))


def _ops_step(avg, sq, src, outs, inputs, weights, weight_tensor, found_inf):
    """Every op once, the way a training step would chain them."""
    OPS.lerp_(avg, src, 0.1, None, found_inf)
    OPS.swag_(avg, sq, src, 0.0, weight_tensor, found_inf)
    OPS.merge_(outs, inputs, weights)
    return OPS.any_nonfinite(outs + avg)


@pytest.mark.parametrize("flag", [0.0, 1.0])
def test_compiled_fullgraph_matches_eager(flag):
    avg, sq, src = _mixed(0), [t.abs() for t in _mixed(1)], _mixed(2)
    outs = [torch.full(s, float("nan")).to(FLOAT_DTYPES[(i + 3) % 4]) for i, s in enumerate(SHAPES)]
    inputs = _mixed(1) + _mixed(2)
    weights = torch.randn(2, dtype=torch.float64).tolist()
    weight_tensor, found_inf = torch.rand((), dtype=torch.float64), torch.tensor(flag)
    args_eager = (avg, sq, src, outs, inputs, weights, weight_tensor, found_inf)
    args_compiled = tuple(_clones(a) if isinstance(a, list) and isinstance(a[0], Tensor) else a
                          for a in args_eager)
    torch._dynamo.reset()
    compiled = torch.compile(_ops_step, fullgraph=True, backend="aot_eager")
    flag_compiled = compiled(*args_compiled)
    flag_eager = _ops_step(*args_eager)
    assert torch.equal(flag_compiled, flag_eager)
    for name, eager, comp in zip(("avg", "sq", "src", "outs", "inputs"), args_eager, args_compiled):
        for i, (e, c) in enumerate(zip(eager, comp)):
            assert c.dtype == e.dtype and torch.equal(c.nan_to_num(), e.nan_to_num()) \
                and torch.equal(c.isnan(), e.isnan()), f"{name}[{i}] differs between compiled and eager"


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_validator_sits_in_front_of_every_kernel_and_has_a_check_op(op):
    """csrc/checks.cpp: BackendSelect kernels for the compiled path, check_* ops for the Python backends."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::{op}", "BackendSelect")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swm_fused::check_{op}", "CompositeImplicitAutograd")


# Direct calls get the contract's messages without a public op name (swm_fused/ops.py adds it).
_DIRECT_BAD_CALLS = {
    "lerp_lengths": (lambda avg, src: OPS.lerp_(avg, src[:-1], 0.5, None, None), ValueError,
                     "avg has 5 tensors but src has 4"),
    "swag_shape": (lambda avg, src: OPS.swag_(avg, avg[:1] + src[1:], src[::-1], 0.5, None, None), ValueError,
                   "shape mismatch at index 0: mean[0] has shape (3, 5) but src[0] has shape (33, 2)"),
    "merge_count": (lambda avg, src: OPS.merge_(avg, src + src[:-1], [0.5, 0.5]), ValueError,
                    "inputs has 9 tensors but 2 weights and 5 outputs need 10"),
    "merge_device": (lambda avg, src: OPS.merge_(avg, src + src[:2] + [torch.empty((), device="meta")] + src[3:],
                                                 [0.5, 0.5]), ValueError,
                     "inputs[1][2] is on meta but out[0] is on cpu; all tensors must be on one device"),
    "lerp_int_output": (lambda avg, src: OPS.lerp_(avg[:1] + [torch.zeros(7, dtype=torch.int32)] + avg[2:], src,
                                                   0.5, None, None), TypeError,
                        "avg[1] has dtype torch.int32; averages and outputs must be float32, float64, bfloat16 "
                        "or float16"),
    "lerp_meta_source": (lambda avg, src: OPS.lerp_(avg, src[:4] + [torch.empty(33, 2, device="meta")], 0.5, None,
                                                    None), ValueError, "src[4] is on meta but avg[0] is on cpu"),
    "any_nonfinite_device": (lambda avg, src: OPS.any_nonfinite(avg + [torch.empty((), device="meta")]),
                             ValueError, "tensors[5] is on meta but tensors[0] is on cpu"),
    "any_nonfinite_int": (lambda avg, src: OPS.any_nonfinite(avg + [torch.ones(2, dtype=torch.int64)]),
                          TypeError, "tensors[5] has dtype torch.int64; sources must be floating point"),
    "found_inf_shape": (lambda avg, src: OPS.lerp_(avg, src, 0.5, None, torch.zeros(2)), ValueError,
                        "found_inf must hold exactly one element, got shape (2,)"),
    "weight_tensor_device": (lambda avg, src: OPS.swag_(avg, avg, src, 0.5, torch.empty((), device="meta"), None),
                             ValueError, "weight_tensor is on meta but the tensors are on cpu"),
}


@pytest.mark.parametrize("name", list(_DIRECT_BAD_CALLS))
def test_op_rejects_bad_lists_before_writing(name):
    """Checked before any kernel, on every device: a meta tensor in a CPU list would otherwise send
    the whole call to the (silent) fake kernel."""
    call, error, message = _DIRECT_BAD_CALLS[name]
    avg, src = _mixed(0), _mixed(1)
    before = _clones(avg)
    with pytest.raises(error) as raised:
        call(avg, src)
    assert str(raised.value).startswith(message)
    assert all(torch.equal(b, a) for b, a in zip(before, avg)), "a rejected call wrote into avg"


def test_meta_lists_still_reach_the_fake_kernels():
    meta = [torch.empty(s, device="meta") for s in SHAPES]
    OPS.lerp_(meta, meta, 0.5, None, None)
    assert OPS.any_nonfinite(meta).device.type == "meta"
