"""swm_fused.integrations.diffusers.EMAModel side by side with diffusers' own EMAModel, step by step.

CPU only, nothing downloaded: the model for save_pretrained/from_pretrained is a tiny ModelMixin built
from its config.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, List

import pytest
import torch
from torch import nn

import swm_fused

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'swm_fused[diffusers]')")
from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.training_utils import EMAModel as RealEMAModel  # noqa: E402

from swm_fused.integrations.diffusers import EMAModel  # noqa: E402
from test_no_sync import forbid_host_sync  # noqa: E402

FP32 = dict(atol=1e-6, rtol=1e-5)  # diffusers rounds three times per step (sub, mul, sub), ours once (fma lerp)
SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


class TinyModel(ModelMixin, ConfigMixin):
    """A diffusers model small enough to save and load in milliseconds."""

    @register_to_config
    def __init__(self, width: int = 6, out: int = 3):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = TinyModel().to(dtype)
    model.norm.weight.requires_grad_(False)  # diffusers copies frozen parameters instead of averaging them
    return model


@torch.no_grad()
def train_step(model: nn.Module) -> None:
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)


def assert_same(theirs: Any, ours: Any, *, exact_frozen: List[int] = (), what: str = "", **tol) -> None:
    ts, os_ = theirs.state_dict(), ours.state_dict()
    assert list(os_) == list(ts), f"{what}: keys differ"
    for key in SCALARS:
        assert os_[key] == ts[key] and type(os_[key]) is type(ts[key]), f"{what}: {key} {os_[key]!r} != {ts[key]!r}"
    assert len(os_["shadow_params"]) == len(ts["shadow_params"])
    for i, (a, b) in enumerate(zip(os_["shadow_params"], ts["shadow_params"])):
        assert a.dtype == b.dtype and a.device == b.device, f"{what}: shadow {i} is {a.dtype}@{a.device}"
        if i in exact_frozen:
            assert torch.equal(a, b), f"{what}: frozen shadow {i} is not an exact copy"
        torch.testing.assert_close(a, b, **(tol or FP32), msg=f"{what}: shadow {i}")


FROZEN = [2]  # norm.weight's index in TinyModel.parameters()

SETTINGS = [
    dict(decay=0.995, min_decay=0.2, update_after_step=3, use_ema_warmup=True, inv_gamma=2.0, power=0.75),
    dict(decay=0.99, update_after_step=2),                      # diffusers' (1 + k) / (10 + k) schedule
    dict(decay=0.999, use_ema_warmup=True, foreach=True),       # their foreach path
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["warmup", "no-warmup", "foreach"])
def test_side_by_side_with_diffusers_step_by_step(settings):
    model = make_model()
    theirs = RealEMAModel(model.parameters(), **settings)
    ours = EMAModel(model.parameters(), **settings)
    for step in range(1, 21):
        train_step(model)
        theirs.step(model.parameters())
        ours.step(model.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
        assert_same(theirs, ours, exact_frozen=FROZEN, what=f"step {step}")


def test_fp32_average_of_a_bf16_model_like_theirs_after_to_float32():
    model = make_model(torch.bfloat16)
    theirs = RealEMAModel(model.parameters(), decay=0.99, use_ema_warmup=True)
    ours = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True)
    theirs.to(dtype=torch.float32)
    ours.to(dtype=torch.float32)  # fp32 shadows; ours reads the bf16 params in the fused pass, no cast copy
    for _ in range(10):
        train_step(model)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert_same(theirs, ours, exact_frozen=FROZEN, what="fp32 of bf16")
    low = EMAModel(model.parameters(), decay=0.9)  # bf16 shadows of bf16 params, as diffusers keeps them
    assert all(s.dtype == torch.bfloat16 for s in low.shadow_params)


@pytest.mark.parametrize("settings", [
    dict(decay=0.9999), dict(decay=0.999, update_after_step=10), dict(decay=0.9999, use_ema_warmup=True),
    dict(decay=0.9, min_decay=0.5, use_ema_warmup=True, update_after_step=5),
    dict(decay=0.99999, use_ema_warmup=True, inv_gamma=3.5, power=1.0)])
def test_decay_schedule_equals_diffusers_at_every_step(settings):
    params = [nn.Parameter(torch.zeros(2))]
    theirs, ours = RealEMAModel(params, **settings), EMAModel(params, **settings)
    steps = [*range(0, 3000), 10 ** 6, 10 ** 9]
    assert [ours.get_decay(s) for s in steps] == [theirs.get_decay(s) for s in steps]


def test_state_dicts_move_both_ways_and_through_torch_save(tmp_path):
    model = make_model()
    theirs = RealEMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    for _ in range(4):
        train_step(model)
        theirs.step(model.parameters())
    ours = EMAModel(model.parameters(), decay=0.5)
    ours.load_state_dict(theirs.state_dict())  # diffusers -> ours
    assert_same(theirs, ours, exact_frozen=range(6), what="loaded from diffusers")
    for _ in range(3):
        train_step(model)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert_same(theirs, ours, exact_frozen=FROZEN, what="continued")
    torch.save(ours.state_dict(), tmp_path / "ema.pt")  # what accelerate's save_state does
    back = RealEMAModel(model.parameters())
    back.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))  # ours -> diffusers
    assert_same(back, ours, exact_frozen=range(6), what="diffusers loading ours")


def test_save_pretrained_and_from_pretrained_interchange(tmp_path):
    model = make_model()
    ours = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, model_cls=TinyModel,
                    model_config=model.config)
    theirs = RealEMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, model_cls=TinyModel,
                          model_config=model.config)
    for _ in range(3):
        train_step(model)
        ours.step(model.parameters())
        theirs.step(model.parameters())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_them = RealEMAModel.from_pretrained(tmp_path / "ours", model_cls=TinyModel)
    loaded_by_us = EMAModel.from_pretrained(tmp_path / "theirs", model_cls=TinyModel)
    ours_again = EMAModel.from_pretrained(tmp_path / "ours", model_cls=TinyModel)
    assert_same(loaded_by_them, ours_again, exact_frozen=range(6), what="one save, two loaders")
    assert_same(theirs, loaded_by_us, exact_frozen=range(6), what="their save, our loader")
    assert_same(theirs, ours_again, what="our save vs their state")
    assert ours_again.model_cls is TinyModel and ours_again.optimization_step == 3
    with pytest.raises(ValueError, match="model_cls"):
        EMAModel(model.parameters()).save_pretrained(tmp_path / "none")


def test_copy_to_store_restore_and_to_match_diffusers():
    model = make_model()
    theirs = RealEMAModel(model.parameters(), decay=0.7)
    ours = EMAModel(model.parameters(), decay=0.7)
    for _ in range(3):
        train_step(model)
        theirs.step(model.parameters())
    ours.load_state_dict(theirs.state_dict())
    training = [p.detach().clone() for p in model.parameters()]
    ours.store(model.parameters())
    ours.copy_to(model.parameters())
    twin = make_model()
    theirs.copy_to(twin.parameters())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # a copy either way
    ours.restore(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), training))  # bit for bit
    assert ours.temp_stored_params is None
    with pytest.raises(RuntimeError, match="store"):
        ours.restore(model.parameters())
    theirs.to(device="cpu", dtype=torch.float64)
    ours.to(device="cpu", dtype=torch.float64)
    assert_same(theirs, ours, exact_frozen=range(6), what="to(float64)")
    if not torch.cuda.is_available():  # no pinned memory without an accelerator, in either
        with pytest.raises(RuntimeError):
            theirs.pin_memory()
        with pytest.raises(RuntimeError):
            ours.pin_memory()


def test_step_with_another_parameter_list_carries_the_average_over():
    """diffusers' scripts build the EMA from a copy of the model, then step with the trained model's parameters."""
    model, copy_ = make_model(), make_model()
    copy_.load_state_dict(model.state_dict())
    theirs = RealEMAModel(copy_.parameters(), decay=0.9, use_ema_warmup=True)
    ours = EMAModel(copy_.parameters(), decay=0.9, use_ema_warmup=True)
    for _ in range(4):
        train_step(model)
        theirs.step(model.parameters())
        ours.step(model.parameters())
    assert_same(theirs, ours, exact_frozen=FROZEN, what="stepped with other parameters")
    with pytest.raises(ValueError, match="parameters"):
        ours.step(list(model.parameters())[:-1])
    with pytest.raises(ValueError, match="shape"):
        ours.step([torch.zeros(1)] * len(list(model.parameters())))
    assert ours.optimization_step == 4  # refused steps count nothing


def test_shadows_are_live_views_of_the_engine():
    model = make_model()
    ours = EMAModel(model.parameters(), decay=0.5)
    before = [s.data_ptr() for s in ours.shadow_params]
    for _ in range(2):  # the first step copies, the second averages
        train_step(model)
        ours.step(model.parameters())
    assert [s.data_ptr() for s in ours.state_dict()["shadow_params"]] == before  # updated in place
    p = next(model.parameters())
    assert not torch.equal(ours.shadow_params[0], p)


def test_step_does_not_synchronise(monkeypatch):
    model = make_model()
    ours = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    ours.step(model.parameters())

    forbid_host_sync(monkeypatch, also=("tolist",))  # an op that reads a CPU tensor may; these updates may not
    for _ in range(3):
        ours.step(model.parameters())  # with a frozen parameter: the fused pass plus its copy
    with pytest.raises(AssertionError):
        torch.zeros(1).item()  # the patches are live


@pytest.mark.skipif("cpp" not in swm_fused.available_backends(), reason="needs the fused cpp backend")
def test_step_allocates_no_temporary_copy_unlike_diffusers_foreach():
    from test_averager import _cpu_allocation_peak

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(3)])
    ours = EMAModel(model.parameters(), decay=0.99)
    theirs = RealEMAModel(model.parameters(), decay=0.99, foreach=True)
    ours.step(model.parameters())
    theirs.step(model.parameters())
    param_bytes = 4 * 256 * 256
    with swm_fused.use_backend("cpp"):
        peak = _cpu_allocation_peak(lambda: ours.step(model.parameters()))
    assert peak < param_bytes // 8, f"step allocated {peak} bytes"
    # diffusers' foreach path: a temporary the size of the model (why its scripts leave foreach off)
    assert _cpu_allocation_peak(lambda: theirs.step(model.parameters())) >= 3 * param_bytes


def test_argument_errors_and_load_state_dict_is_all_or_nothing():
    model = make_model()
    with pytest.raises(ValueError, match="decay"):
        EMAModel(model.parameters(), decay=2.0)
    with pytest.raises(TypeError, match="decay"):
        EMAModel(model.parameters(), decay="0.9")
    with pytest.raises(ValueError, match="no parameters"):
        EMAModel([])
    with pytest.raises(TypeError, match="not a Tensor"):
        EMAModel([1.0, 2.0])
    ours = EMAModel(model.parameters(), decay=0.9)
    state = {k: v for k, v in ours.state_dict().items()}
    shadows = [s.clone() for s in ours.shadow_params]
    for bad, match in ((dict(state, decay=1.5, shadow_params=[s + 1 for s in shadows]), "Decay"),
                       (dict(state, optimization_step=1.0), "optimization_step"),
                       (dict(state, shadow_params=tuple(shadows)), "list"),
                       (dict(state, shadow_params=shadows[:-1]), "tracks"),
                       (dict(state, optimization_step=7, shadow_params=[torch.zeros(1)] * len(shadows)), "shape")):
        with pytest.raises(ValueError, match=match):
            ours.load_state_dict(bad)
        assert ours.optimization_step == 0 and ours.decay == 0.9
        assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, shadows))


def test_missing_diffusers_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what `import diffusers` sees when it is not installed
    monkeypatch.delitem(sys.modules, "swm_fused.integrations.diffusers")
    with pytest.raises(ImportError, match=r"pip install 'swm_fused\[diffusers\]'"):
        importlib.import_module("swm_fused.integrations.diffusers")


# ------------------------------------------------------------------------------ offload (GPU only)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to offload from")


@needs_gpu
def test_offload_loops_match_diffusers_on_a_gpu():
    """diffusers' offload loop (pin, then to('cuda') before each step and to('cpu') after), and ours: the EMA
    stays on the CPU and step() reads the GPU parameters through a staging buffer, fused."""
    model = make_model().cuda()
    theirs = RealEMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    loop = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    resident = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    for ema in (theirs, loop, resident):
        ema.to("cpu")
    theirs.pin_memory()
    loop.pin_memory()
    assert all(s.is_pinned() for s in loop.shadow_params)
    for _ in range(6):
        train_step(model)
        for ema in (theirs, loop):
            ema.to(device="cuda", non_blocking=True)
            ema.step(model.parameters())
            ema.to(device="cpu", non_blocking=True)
        resident.step(model.parameters())
    torch.cuda.synchronize()
    assert_same(theirs, loop, exact_frozen=FROZEN, what="diffusers' loop")
    assert_same(theirs, resident, exact_frozen=FROZEN, what="resident on the CPU")
    assert all(s.device.type == "cpu" for s in resident.shadow_params)


@needs_gpu
def test_step_on_a_gpu_passes_the_sync_debug_mode():
    model = make_model().cuda()
    ours = EMAModel(model.parameters(), decay=0.9)
    ours.step(model.parameters())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ours.step(model.parameters())
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_example_runs():
    import pathlib
    import runpy

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "diffusers_ema.py"
    result = runpy.run_path(str(path))["main"](["--steps", "20"])
    assert set(result) == {"model", "ema"}
