"""swm_fused.integrations.timm.ModelEmaV3 side by side with timm's own ModelEmaV3, step by step.

timm's class is its real source (timm/utils/model_ema.py) loaded without importing the timm package,
which needs torchvision (see tests/_timm_source.py). Our class needs no timm at all.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict

import pytest
import torch
from torch import nn

import swm_fused
from _timm_source import SKIP_REASON, timm_model_ema, timm_version
from swm_fused.integrations.timm import ModelEmaV3
from test_no_sync import forbid_host_sync

TIMM = timm_model_ema()
needs_timm = pytest.mark.skipif(TIMM is None, reason=SKIP_REASON)
print(f"timm {timm_version()}")


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Parameters, float buffers (BatchNorm running stats) and an integer buffer (num_batches_tracked)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5)).to(dtype)


@torch.no_grad()
def train_step(model: nn.Module, dtype: torch.dtype) -> None:
    """A stand-in for an optimizer step plus a forward in train mode (moves the BatchNorm buffers)."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    model.train()
    model(torch.randn(2, 3, 6, 6, dtype=dtype))


def assert_same_state(theirs: Dict[str, torch.Tensor], ours: Dict[str, torch.Tensor], *, exact: bool = True,
                      atol: float = 0.0, rtol: float = 0.0, what: str = "") -> None:
    assert list(ours) == list(theirs), f"{what}: state_dict keys differ"
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, f"{what}: {key} dtype {ours[key].dtype} != {theirs[key].dtype}"
        if exact:
            assert torch.equal(ours[key], theirs[key]), \
                f"{what}: {key} differs by {(ours[key].double() - theirs[key].double()).abs().max().item()}"
        else:
            torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=rtol, msg=f"{what}: {key}")


WARMUP = dict(decay=0.995, min_decay=0.2, update_after_step=3, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75)

# (model dtype, extra arguments, bit for bit?). Every case runs timm's real class beside ours.
CASES = [
    (torch.float32, {}, True),
    (torch.float32, dict(exclude_buffers=True), True),
    (torch.float32, dict(foreach=False), True),
    (torch.float32, dict(device="cpu"), True),   # timm: 'cpu' != torch.device('cpu'), so its foreach goes off
    (torch.float64, {}, True),
    (torch.bfloat16, dict(stochastic_rounding=False), True),  # one bf16 rounding of the same fp32 lerp
    (torch.bfloat16, {}, True),                  # timm's stochastic rounding: same generator, same stream
    (torch.bfloat16, dict(foreach=False), True),  # its per-tensor chunks
    (torch.bfloat16, dict(dtype=torch.float32, foreach=False), True),  # timm lerps a cast copy, we lerp in fp32
    (torch.bfloat16, dict(dtype=torch.float32), False),  # timm's foreach path: mul_ then add_ (two roundings)
]


def _needs_new_timm(kwargs: Dict[str, Any]) -> None:
    params = inspect.signature(TIMM.ModelEmaV3.__init__).parameters
    missing = [k for k in kwargs if k not in params]
    if missing:
        pytest.skip(f"timm {timm_version()} has no {missing}")


@needs_timm
@pytest.mark.parametrize("dtype, extra, exact", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_side_by_side_with_timm_step_by_step(dtype, extra, exact):
    _needs_new_timm(extra)
    model = make_model(dtype)
    theirs = TIMM.ModelEmaV3(model, **WARMUP, **extra)
    ours = ModelEmaV3(model, **WARMUP, **extra)
    assert ours.foreach == theirs.foreach
    for step in range(1, 16):
        train_step(model, dtype)
        assert ours.get_decay(step) == theirs.get_decay(step)
        theirs.update(model, step=step)
        ours.update(model, step=step)
        assert_same_state(theirs.state_dict(), ours.state_dict(), exact=exact, atol=1e-6, rtol=1e-5,
                          what=f"step {step}")
    x = torch.randn(2, 3, 6, 6, dtype=extra.get("dtype", dtype))
    torch.testing.assert_close(ours(x), theirs(x), atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)
    # no step number: the plain decay, as in timm
    train_step(model, dtype)
    theirs.update(model)
    ours.update(model)
    assert_same_state(theirs.state_dict(), ours.state_dict(), exact=exact, atol=1e-6, rtol=1e-5, what="step=None")


@needs_timm
@pytest.mark.parametrize("settings", [
    dict(decay=0.9999), dict(decay=0.999, update_after_step=10),
    dict(decay=0.9999, use_warmup=True), dict(decay=0.9, min_decay=0.5, use_warmup=True, update_after_step=5),
    dict(decay=0.99999, use_warmup=True, warmup_gamma=3.5, warmup_power=1.0)])
def test_decay_schedule_equals_timms_at_every_step(settings):
    model = nn.Linear(2, 2)
    theirs, ours = TIMM.ModelEmaV3(model, **settings), ModelEmaV3(model, **settings)
    steps = [None, *range(0, 3000), 10 ** 6, 10 ** 9]
    assert [ours.get_decay(s) for s in steps] == [theirs.get_decay(s) for s in steps]


@needs_timm
def test_checkpoints_move_both_ways():
    model = make_model()
    theirs, ours = TIMM.ModelEmaV3(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for step in range(1, 4):
        train_step(model, torch.float32)
        theirs.update(model, step=step)
    ours.load_state_dict(theirs.state_dict())  # timm -> ours
    assert_same_state(theirs.state_dict(), ours.state_dict(), what="after loading timm's")
    for step in range(4, 7):
        train_step(model, torch.float32)
        theirs.update(model, step=step)
        ours.update(model, step=step)
    assert_same_state(theirs.state_dict(), ours.state_dict(), what="continued")
    fresh = TIMM.ModelEmaV3(make_model(), decay=0.9)
    fresh.load_state_dict(ours.state_dict())  # ours -> timm
    assert_same_state(fresh.state_dict(), ours.state_dict(), what="timm loading ours")
    # timm's train.py saves the unwrapped module's state (no "module." prefix); it loads into ours too
    other = ModelEmaV3(make_model(), decay=0.9)
    other.module.load_state_dict(theirs.module.state_dict())
    assert_same_state(theirs.state_dict(), other.state_dict(), what="state_dict_ema")


@needs_timm
def test_set_copies_the_model_like_timms():
    model = make_model()
    theirs, ours = TIMM.ModelEmaV3(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for step in range(1, 4):
        train_step(model, torch.float32)
        theirs.update(model, step=step)
        ours.update(model, step=step)
    train_step(model, torch.float32)
    theirs.set(model)
    ours.set(model)
    assert_same_state(theirs.state_dict(), ours.state_dict(), what="set")
    assert_same_state({f"module.{k}": v for k, v in model.state_dict().items()}, ours.state_dict(), what="model")


def test_updates_land_in_module_state_dict_and_forward_without_copies():
    model = make_model()
    ours = ModelEmaV3(model, decay=0.5)
    views = {name: t.data_ptr() for name, t in ours.state_dict().items()}
    train_step(model, torch.float32)
    ours.update(model)
    state = ours.state_dict()
    assert {name: t.data_ptr() for name, t in state.items()} == views  # updated in place, in the engine's storage
    engine_ptrs = {v.data_ptr() for v in ours.engine.views()}
    assert all(state[f"module.{name}"].data_ptr() in engine_ptrs for name in ours.engine.names)
    assert list(state) == [f"module.{k}" for k in model.state_dict()]  # timm's keys
    assert not ours.module.training  # eval mode, as timm


def test_wrapped_model_pairs_with_the_inner_one_and_other_models_re_pair():
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from here
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    model = make_model()
    ours = ModelEmaV3(model, decay=0.5)
    reference = ModelEmaV3(model, decay=0.5)
    engine = ours.engine
    train_step(model, torch.float32)
    ours.update(Wrapper(model), step=5)
    reference.update(model, step=5)
    assert ours.engine is engine  # no re-pairing for a wrapper of the same model
    compiled = nn.Module()
    compiled._orig_mod = model  # how torch.compile's OptimizedModule holds the model
    train_step(model, torch.float32)
    ours.update(compiled, step=6)
    reference.update(model, step=6)
    assert ours.engine is engine
    assert_same_state(reference.state_dict(), ours.state_dict(), what="wrapped")
    other = make_model()
    other.load_state_dict(model.state_dict())
    ours.update(other, step=7)  # same names and shapes: re-paired, the average carries over
    reference.update(model, step=7)
    assert ours.engine is not engine
    assert_same_state(reference.state_dict(), ours.state_dict(), what="re-paired")
    with pytest.raises(ValueError, match="cannot be paired"):
        ours.update(nn.Linear(3, 3))


@needs_timm
def test_moving_the_ema_rebinds_its_storage():
    model = make_model()
    theirs, ours = TIMM.ModelEmaV3(model, decay=0.8), ModelEmaV3(model, decay=0.8)
    theirs.to(torch.float64)
    ours.to(torch.float64)  # nn.Module.to replaces each tensor's data; the engine follows it
    assert all(v.dtype == torch.float64 for v in ours.engine.views()[:2])
    for step in range(1, 5):
        train_step(model, torch.float32)
        theirs.update(model, step=step)
        ours.update(model, step=step)
    # timm multiplies and adds (mixed dtypes), ours lerps in float64: within rounding
    assert_same_state(theirs.state_dict(), ours.state_dict(), exact=False, atol=1e-12, rtol=1e-12, what="fp64")
    # load_state_dict(assign=True) swaps the tensors out from under the engine: the next update rebinds
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, assign=True)
    train_step(model, torch.float32)
    theirs.update(model, step=9)
    ours.update(model, step=9)
    assert_same_state(theirs.state_dict(), ours.state_dict(), exact=False, atol=1e-12, rtol=1e-12, what="assigned")
    engine_ptrs = {v.data_ptr() for v in ours.engine.views()}
    assert all(t.data_ptr() in engine_ptrs for t in ours.module.parameters())


def test_update_does_not_synchronise(monkeypatch):
    model = make_model()
    fused = ModelEmaV3(model, decay=0.9, use_warmup=True)
    rounded = ModelEmaV3(model.to(torch.bfloat16), decay=0.9)  # timm's stochastic rounding path
    fused.update(model, step=1)
    rounded.update(model, step=1)

    forbid_host_sync(monkeypatch, also=("tolist",))  # an op that reads a CPU tensor may; these updates may not
    for step in range(2, 5):
        fused.update(model, step=step)
        rounded.update(model, step=step)
    with pytest.raises(AssertionError):
        torch.zeros(1).item()  # the patches are live


@pytest.mark.skipif("cpp" not in swm_fused.available_backends(), reason="needs the fused cpp backend")
def test_update_allocates_no_model_sized_temporaries():
    from test_averager import _cpu_allocation_peak

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(3)]).to(torch.bfloat16)
    ours = ModelEmaV3(model, decay=0.99, dtype=torch.float32)  # fp32 EMA of a bf16 model, fused
    ours.update(model, step=1)
    smallest = 2 * 256 * 256
    with swm_fused.use_backend("cpp"):
        peak = _cpu_allocation_peak(lambda: ours.update(model, step=2))
    assert peak < smallest // 8, f"update allocated {peak} bytes"
    # the measurement does see a model-sized temporary when there is one (a cast copy of the model)
    views = ours.engine.views()
    assert _cpu_allocation_peak(lambda: torch._foreach_lerp_(views, [p.float() for p in model.parameters()], 0.01)) \
        >= 4 * 256 * 256


def test_argument_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        ModelEmaV3({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="decay"):
        ModelEmaV3(model, decay=1.5)
    with pytest.raises(TypeError, match="decay"):
        ModelEmaV3(model, decay="0.9")
    with pytest.raises(ValueError, match="warmup_gamma"):
        ModelEmaV3(model, warmup_gamma=0)
    with pytest.raises(ValueError, match="update_after_step"):
        ModelEmaV3(model, update_after_step=-1)
    with pytest.raises(TypeError, match="dtype"):
        ModelEmaV3(model, dtype="float32")
    with pytest.raises(ValueError, match="no parameters"):
        ModelEmaV3(nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        ModelEmaV3(model).update([torch.zeros(2)])


# ------------------------------------------------------------------------------ offload (GPU only)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to offload from")


@needs_timm
@needs_gpu
@pytest.mark.parametrize("dtype, extra", [(torch.float32, {}), (torch.bfloat16, dict(dtype=torch.float32)),
                                          (torch.bfloat16, {})])
def test_cpu_offload_of_a_gpu_model_matches_timm(dtype, extra):
    """timm turns foreach off for an EMA on another device; ours stays one fused pass, bit for bit with timm."""
    _needs_new_timm(extra)
    model = make_model(dtype).cuda()
    theirs = TIMM.ModelEmaV3(model, device="cpu", **WARMUP, **extra)
    ours = ModelEmaV3(model, device="cpu", **WARMUP, **extra)
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            model.train()
            model(torch.randn(2, 3, 6, 6, dtype=dtype, device="cuda"))
        theirs.update(model, step=step)
        ours.update(model, step=step)
    assert all(v.device.type == "cpu" for v in ours.state_dict().values())
    assert_same_state(theirs.state_dict(), ours.state_dict(), what="offloaded")


@needs_gpu
def test_update_on_a_gpu_passes_the_sync_debug_mode():
    model = make_model().cuda()
    ours = ModelEmaV3(model, decay=0.9, use_warmup=True)
    ours.update(model, step=1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            ours.update(model, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_example_runs():
    import pathlib
    import runpy

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "timm_ema.py"
    result = runpy.run_path(str(path))["main"](["--steps", "20"])
    assert set(result) == {"model", "ema", "fp32 ema of bf16"}
