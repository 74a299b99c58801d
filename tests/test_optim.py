"""swm_fused.optim.SWA / EMA: real training loops against hand-written torch + float64 oracles,
LR schedulers (SWALR), GradScaler with inf steps, resume, param-group plumbing and bn_update."""
from __future__ import annotations

import copy
import importlib
import io
import math
import random
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from swm_fused.averager import EMAWarmup
from swm_fused.optim import EMA, SWA

from _helpers import assert_close, bits

FP32_TOL = dict(atol=2e-6, rtol=2e-5)
BATCHES = 4


def timm_decay(step: int, decay: float, update_after_step: int = 0, warmup_gamma: float = 1.0,
               warmup_power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """timm ModelEmaV3.get_decay(step), use_warmup=True, written out independently."""
    k = step - update_after_step - 1
    if k <= 0:
        return 0.0
    return max(min(1.0 - math.pow(1.0 + k / warmup_gamma, -warmup_power), decay), min_decay)


def make_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(13, 24), nn.Tanh(), nn.Linear(24, 5)).to(dtype)


def twin_models(dtype: torch.dtype = torch.float32):
    a, b = make_mlp(dtype), make_mlp(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def param_groups(model: nn.Module) -> List[Dict]:
    """Two groups (weights, biases) with different learning rates."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.03}]


def make_data(dtype: torch.dtype = torch.float32):
    return [(torch.randn(16, 13, dtype=dtype), torch.randn(16, 5, dtype=dtype)) for _ in range(BATCHES)]


def loss_of(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y.float())


def train_step(model: nn.Module, optimizer, batch) -> None:
    optimizer.zero_grad()
    loss_of(model, batch).backward()
    optimizer.step()


def float64_params(model: nn.Module) -> List[Tensor]:
    return [p.detach().double().clone() for p in model.parameters()]


def wrapper_averages(optimizer, model: nn.Module) -> List[Tensor]:
    """The wrapper's averages in model.parameters() order."""
    by_param = {}
    averages = optimizer.average_state_dict()
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            by_param[id(p)] = averages[f"{g}.{i}"]
    return [by_param[id(p)] for p in model.parameters()]


def assert_same_params(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(bits(pa), bits(pb)), f"{what}: {name}"


# ------------------------------------------------------------------------- training loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("warmup", [None, dict(update_after_step=1, warmup_gamma=2.0, warmup_power=0.7)])
def test_ema_wrapper_equals_hand_written_ema(dtype, warmup):
    model, twin = twin_models(dtype)
    data = make_data(dtype)
    decay, every = random.uniform(0.6, 0.9), random.choice([1, 2])
    optimizer = EMA(torch.optim.SGD(param_groups(model), momentum=0.9), decay=decay, warmup=warmup, every=every)
    plain = torch.optim.SGD(param_groups(twin), momentum=0.9)
    oracle: Optional[List[Tensor]] = None
    for n in range(1, 13):
        batch = data[n % BATCHES]
        train_step(model, optimizer, batch)
        train_step(twin, plain, batch)
        if n % every == 0:  # the wrapper's step count is its number of step() calls
            if oracle is None:
                oracle = float64_params(twin)
            else:
                d = timm_decay(n, decay, **warmup) if warmup else decay
                oracle = [torch.lerp(o, p, 1 - d) for o, p in zip(oracle, float64_params(twin))]
    assert_same_params(model, twin, "training must not be changed by the wrapper")
    averages = wrapper_averages(optimizer, model)
    for avg, expected in zip(averages, oracle):
        assert avg.dtype == torch.float32  # fp32 average even for bf16 params
        assert_close(avg, expected, what="ema", **FP32_TOL)

    training = [p.detach().clone() for p in model.parameters()]
    with optimizer.swapped():
        for p, avg in zip(model.parameters(), averages):
            assert torch.equal(p, avg.to(dtype))
        with pytest.raises(RuntimeError, match="swapped"):
            optimizer.step()
    for p, before in zip(model.parameters(), training):
        assert torch.equal(bits(p), bits(before))


@pytest.mark.parametrize("swa_lr", [None, 0.02])
@pytest.mark.parametrize("swa_start,swa_freq", [(4, 2), (5, 3)])  # (4, 2): step 4 is not yet averaged
def test_swa_wrapper_auto_mode_equals_torchcontrib_semantics(swa_start, swa_freq, swa_lr):
    model, twin = twin_models()
    data = make_data()
    optimizer = SWA(torch.optim.SGD(param_groups(model), momentum=0.9), swa_start=swa_start,
                    swa_freq=swa_freq, swa_lr=swa_lr)
    plain = torch.optim.SGD(param_groups(twin), momentum=0.9)
    snapshots = []
    for steps in range(1, 15):
        # torchcontrib: lr becomes swa_lr for steps taken once step_counter >= swa_start
        if swa_lr is not None and steps - 1 >= swa_start:
            for group in plain.param_groups:
                group["lr"] = swa_lr
        batch = data[steps % BATCHES]
        train_step(model, optimizer, batch)
        train_step(twin, plain, batch)
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in plain.param_groups]
        assert all(g["step_counter"] == steps for g in optimizer.param_groups)
        if steps > swa_start and steps % swa_freq == 0:
            snapshots.append(float64_params(twin))
    assert_same_params(model, twin, "training")
    expected = [torch.stack(ps).mean(0) for ps in zip(*snapshots)]
    averages = [a.clone() for a in wrapper_averages(optimizer, model)]
    for avg, exp in zip(averages, expected):
        assert_close(avg, exp, what="swa", **FP32_TOL)

    training = [p.detach().clone() for p in model.parameters()]
    optimizer.swap_swa_sgd()
    for p, avg in zip(model.parameters(), averages):
        assert torch.equal(p, avg)
    optimizer.swap_swa_sgd()
    for p, before in zip(model.parameters(), training):
        assert torch.equal(bits(p), bits(before))
    for avg, kept in zip(wrapper_averages(optimizer, model), averages):
        assert torch.equal(bits(avg), bits(kept))


def test_swa_manual_mode_bf16_params_fp32_average_and_groups():
    model, twin = twin_models(torch.bfloat16)
    data = make_data(torch.bfloat16)
    optimizer = SWA(torch.optim.SGD(param_groups(model), momentum=0.5))
    plain = torch.optim.SGD(param_groups(twin), momentum=0.5)
    with pytest.warns(UserWarning, match="wasn't applied"):
        optimizer.swap_swa_sgd()  # nothing averaged yet: weights untouched
    assert_same_params(model, twin, "swap without averages")
    weight_snaps, all_snaps = [], []
    for n in range(1, 9):
        batch = data[n % BATCHES]
        train_step(model, optimizer, batch)
        train_step(twin, plain, batch)
        if n % 2 == 0:
            optimizer.update_swa()
            all_snaps.append(float64_params(twin))
        else:
            optimizer.update_swa_group(optimizer.param_groups[0])  # weights only
            weight_snaps.append(float64_params(twin))
    is_weight = [n.endswith("weight") for n, _ in model.named_parameters()]
    for i, avg in enumerate(wrapper_averages(optimizer, model)):
        snaps = all_snaps + weight_snaps if is_weight[i] else all_snaps
        assert avg.dtype == torch.float32
        assert_close(avg, torch.stack([s[i] for s in snaps]).mean(0), what=f"param {i}", **FP32_TOL)
    with pytest.raises(ValueError, match="param_groups"):
        optimizer.update_swa_group({"params": []})


# ---------------------------------------------------------------------------- schedulers
def _swalr_classes():
    classes = [pytest.param(torch.optim.swa_utils.SWALR, id="torch-SWALR")]
    try:
        classes.append(pytest.param(importlib.import_module("swm_fused.swa_utils").SWALR, id="swm_fused-SWALR"))
    except (ImportError, AttributeError):
        pass
    return classes


@pytest.mark.parametrize("swalr", _swalr_classes())
@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_swalr_drives_the_swa_wrapper(swalr, strategy):
    model, twin = twin_models()
    data = make_data()
    optimizer = SWA(torch.optim.SGD(param_groups(model)))
    plain = torch.optim.SGD(param_groups(twin))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()" must not fire
        sched = swalr(optimizer, swa_lr=[0.05, 0.01], anneal_epochs=3, anneal_strategy=strategy)
        ref = torch.optim.swa_utils.SWALR(plain, swa_lr=[0.05, 0.01], anneal_epochs=3, anneal_strategy=strategy)
        snapshots = []
        for n in range(7):
            batch = data[n % BATCHES]
            train_step(model, optimizer, batch)
            train_step(twin, plain, batch)
            optimizer.update_swa()
            snapshots.append(float64_params(twin))
            sched.step()
            ref.step()
            assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in plain.param_groups]
    assert_same_params(model, twin, "SWALR")
    for avg, snaps in zip(wrapper_averages(optimizer, model), zip(*snapshots)):
        assert_close(avg, torch.stack(snaps).mean(0), what="swa under SWALR", **FP32_TOL)


def test_lr_scheduler_drives_the_ema_wrapper():
    model, twin = twin_models()
    data = make_data()
    optimizer = EMA(torch.optim.SGD(param_groups(model), momentum=0.9), decay=0.5)
    plain = torch.optim.SGD(param_groups(twin), momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched, ref = CosineAnnealingLR(optimizer, T_max=5), CosineAnnealingLR(plain, T_max=5)
        for n in range(6):
            train_step(model, optimizer, data[n % BATCHES])
            train_step(twin, plain, data[n % BATCHES])
            sched.step()
            ref.step()
            assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in plain.param_groups]
    assert_same_params(model, twin, "cosine schedule")


# ---------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_grad_scaler_skips_inf_steps_for_optimizer_and_average(kind):
    model, twin = twin_models()
    data = make_data()
    inner = torch.optim.SGD(param_groups(model), momentum=0.9)
    optimizer = EMA(inner, decay=0.7) if kind == "ema" else SWA(inner, swa_start=0, swa_freq=1)
    plain = torch.optim.SGD(param_groups(twin), momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scaler_ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    bad_step = random.randrange(2, 8)
    oracle: Optional[List[Tensor]] = None
    taken = 0
    for n in range(1, 10):
        batch = data[n % BATCHES]
        for mdl, opt, sc in ((model, optimizer, scaler), (twin, plain, scaler_ref)):
            opt.zero_grad()
            sc.scale(loss_of(mdl, batch)).backward()
            if n == bad_step:
                mdl[2].weight.grad[1, 3] = float("inf")
            if mdl is model:
                before = [a.clone() for a in wrapper_averages(optimizer, model)] if n == bad_step else None
            sc.step(opt)
            sc.update()
        if n == bad_step:
            for avg, kept in zip(wrapper_averages(optimizer, model), before):
                assert torch.equal(bits(avg), bits(kept)), "the skipped step touched the average"
            continue
        taken += 1
        current = float64_params(twin)
        if oracle is None:
            oracle = current
        elif kind == "ema":
            oracle = [torch.lerp(o, p, 0.3) for o, p in zip(oracle, current)]
        else:
            oracle = [o + (p - o) / taken for o, p in zip(oracle, current)]
    assert scaler.get_scale() == scaler_ref.get_scale()
    if kind == "ema":
        assert optimizer.steps[0] == taken  # the skipped step is not counted
    else:
        assert [g["step_counter"] for g in optimizer.param_groups] == [taken, taken]
    assert_same_params(model, twin, "GradScaler")
    for avg, exp in zip(wrapper_averages(optimizer, model), oracle):
        assert_close(avg, exp, what=f"{kind} with GradScaler", **FP32_TOL)


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_wrapper_resume_is_exact(kind):
    data = make_data()
    steps = 12

    def build(model):
        inner = torch.optim.SGD(param_groups(model), momentum=0.9)
        if kind == "ema":
            return EMA(inner, decay=0.8, warmup=EMAWarmup(warmup_gamma=3.0), every=2)
        return SWA(inner, swa_start=3, swa_freq=2, swa_lr=0.05)

    init = make_mlp()
    straight_model = make_mlp()
    straight_model.load_state_dict(init.state_dict())
    straight = build(straight_model)
    for n in range(steps):
        train_step(straight_model, straight, data[n % BATCHES])

    first_model = make_mlp()
    first_model.load_state_dict(init.state_dict())
    first = build(first_model)
    for n in range(steps // 2):
        train_step(first_model, first, data[n % BATCHES])
    blob = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, blob)
    blob.seek(0)
    checkpoint = torch.load(blob)
    resumed_model = make_mlp()  # fresh random weights, overwritten by the checkpoint
    resumed = build(resumed_model)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    for n in range(steps // 2, steps):
        train_step(resumed_model, resumed, data[n % BATCHES])

    assert_same_params(resumed_model, straight_model, "resumed training")
    for a, b in zip(wrapper_averages(resumed, resumed_model), wrapper_averages(straight, straight_model)):
        assert torch.equal(bits(a), bits(b))
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in straight.param_groups]


def test_wrapper_load_state_dict_rejects_bad_state_and_changes_nothing():
    model = make_mlp()
    optimizer = EMA(torch.optim.SGD(param_groups(model), momentum=0.9), decay=0.5)
    data = make_data()
    for n in range(3):
        train_step(model, optimizer, data[n])
    good = optimizer.state_dict()
    before = [a.clone() for a in wrapper_averages(optimizer, model)]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    with pytest.raises(ValueError, match="one entry per param group"):
        optimizer.load_state_dict({"optimizer": good["optimizer"], "averages": good["averages"][:1]})
    broken = dict(good["averages"][1])
    broken["average"] = {**broken["average"], "0": torch.zeros(99)}
    with pytest.raises(ValueError, match="param group 1"):
        optimizer.load_state_dict({"optimizer": good["optimizer"], "averages": [good["averages"][0], broken]})
    for a, b in zip(wrapper_averages(optimizer, model), before):
        assert torch.equal(bits(a), bits(b))
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)


# ------------------------------------------------------------------- optimizer plumbing
def test_wrappers_delegate_param_groups_state_zero_grad_and_add_param_group():
    first, second = nn.Linear(6, 4), nn.Linear(4, 3)
    inner = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    optimizer = EMA(inner, decay=0.6)
    assert optimizer.param_groups is inner.param_groups and optimizer.state is inner.state
    assert optimizer.defaults is inner.defaults
    x, y = torch.randn(8, 6), torch.randn(8, 3)

    def loss() -> Tensor:
        return nn.functional.mse_loss(second(first(x)), y)

    oracle: List[Optional[Tensor]] = [None] * 4
    for n in range(1, 8):
        if n == 4:
            optimizer.add_param_group({"params": list(second.parameters()), "lr": 0.05})
            assert len(optimizer.param_groups) == len(inner.param_groups) == 2
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        params = list(first.parameters()) + (list(second.parameters()) if n >= 4 else [])
        for i, p in enumerate(params):
            current = p.detach().double()
            oracle[i] = current.clone() if oracle[i] is None else torch.lerp(oracle[i], current, 0.4)
    averages = optimizer.average_state_dict()
    assert list(averages) == ["0.0", "0.1", "1.0", "1.1"]
    for avg, exp in zip(averages.values(), oracle):
        assert_close(avg, exp, what="EMA with an added group", **FP32_TOL)

    loss().backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in first.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in first.parameters())

    swa = SWA(torch.optim.SGD(first.parameters(), lr=0.1))
    swa.add_param_group({"params": list(second.parameters())})
    assert [g["step_counter"] for g in swa.param_groups] == [0, 0]
    assert "SWA(" in repr(swa) and "SGD" in repr(swa)


def test_wrapper_validation():
    model = make_mlp()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SWA(model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        EMA([torch.zeros(1)])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="swa_start"):
        SWA(sgd, swa_start=-1, swa_freq=1)
    with pytest.raises(ValueError, match="swa_freq"):
        SWA(sgd, swa_start=0, swa_freq=0)
    with pytest.raises(ValueError, match="swa_lr"):
        SWA(sgd, swa_start=0, swa_freq=1, swa_lr=-0.1)
    with pytest.warns(UserWarning, match="Casting swa_start, swa_freq to int"):  # torchcontrib's rule
        assert SWA(sgd, swa_start=1.5, swa_freq=1).swa_start == 1
    with pytest.warns(UserWarning, match="swa_lr is ignored"):
        manual = SWA(sgd, swa_lr=0.1)
    assert manual.swa_lr is None and manual.swa_start is None
    with pytest.warns(UserWarning, match="manual mode"):
        SWA(sgd, swa_start=3)
    with pytest.raises(ValueError, match="decay"):
        EMA(sgd, decay=1.5)


# -------------------------------------------------------------------------------- bn_update
@pytest.mark.parametrize("with_targets", [True, False])
def test_bn_update_weights_batches_by_size(with_targets):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3), nn.ReLU())
    model.eval()
    sizes = [5, 9, 3, 12]
    inputs = [torch.randn(b, 4) * 2 + 1 for b in sizes]
    loader = [(x, torch.zeros(len(x))) for x in inputs] if with_targets else inputs
    SWA.bn_update(loader, model, device="cpu")
    assert not model.training and model[1].momentum == 0.3
    with torch.no_grad():
        hidden = [model[0](x).double() for x in inputs]
    total = sum(sizes)
    mean = sum(b * h.mean(0) for b, h in zip(sizes, hidden)) / total
    var = sum(b * h.var(0, unbiased=True) for b, h in zip(sizes, hidden)) / total
    assert_close(model[1].running_mean, mean, what="running_mean", atol=1e-5, rtol=1e-5)
    assert_close(model[1].running_var, var, what="running_var", atol=1e-5, rtol=1e-5)
    SWA.bn_update(loader, make_mlp())  # no BatchNorm: nothing to do


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_deepcopy_of_model_and_wrapper_trains_identically_and_independently(kind):
    model = make_mlp()
    inner = torch.optim.SGD(param_groups(model), momentum=0.9)
    optimizer = EMA(inner, decay=0.7) if kind == "ema" else SWA(inner, swa_start=0, swa_freq=1)
    data = make_data()
    for n in range(3):
        train_step(model, optimizer, data[n])
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    for n in range(3, 6):
        train_step(model, optimizer, data[n % BATCHES])
        train_step(model_copy, optimizer_copy, data[n % BATCHES])
    assert_same_params(model_copy, model, "deep copy")
    for a, b in zip(wrapper_averages(optimizer_copy, model_copy), wrapper_averages(optimizer, model)):
        assert torch.equal(bits(a), bits(b)) and a.data_ptr() != b.data_ptr()


# ------------------------------------------------------------------ torchcontrib.optim.SWA, side by side
class TorchcontribSWA(Optimizer):
    """A port of ``torchcontrib.optim.SWA`` (pytorch/contrib, torchcontrib/optim/swa.py), written from its
    documented behaviour for these tests (torchcontrib is not installable on current Python/torch).

    Its own ``state`` holds ``swa_buffer`` per param (created at the param's first average, in the
    param's dtype); ``param_groups`` are the wrapped optimizer's, with ``n_avg`` and ``step_counter``;
    the average is ``buf += (p - buf) * (1 / (n_avg + 1))``; ``swap_swa_sgd`` exchanges the params and
    the buffers; ``state_dict()`` is ``{"opt_state", "swa_state" (keyed by id(p)), "param_groups"}``.
    """

    def __init__(self, optimizer, swa_start=None, swa_freq=None, swa_lr=None):
        params = [swa_start, swa_freq]
        none = [p is None for p in params]
        if not all(none) and any(none):
            warnings.warn("Some of swa_start, swa_freq is None, ignoring other")
        for i, p in enumerate(params):
            if p is not None and not isinstance(p, int):
                params[i] = int(p)
                warnings.warn("Casting swa_start, swa_freq to int")
        self._auto_mode = not any(none)
        self.swa_start, self.swa_freq = params
        self.swa_lr = swa_lr
        if self._auto_mode:
            if self.swa_start < 0:
                raise ValueError(f"Invalid swa_start: {self.swa_start}")
            if self.swa_freq < 1:
                raise ValueError(f"Invalid swa_freq: {self.swa_freq}")
        else:
            if self.swa_lr is not None:
                warnings.warn("Some of swa_start, swa_freq is None, ignoring swa_lr")
            self.swa_lr = self.swa_start = self.swa_freq = None
        if self.swa_lr is not None and self.swa_lr < 0:
            raise ValueError(f"Invalid SWA learning rate: {swa_lr}")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = defaultdict(dict)
        self.opt_state = optimizer.state
        for group in self.param_groups:
            group["n_avg"] = 0
            group["step_counter"] = 0

    def _reset_lr_to_swa(self):
        if self.swa_lr is None:
            return
        for group in self.param_groups:
            if group["step_counter"] >= self.swa_start:
                group["lr"] = self.swa_lr

    def update_swa_group(self, group):
        for p in group["params"]:
            state = self.state[p]
            if "swa_buffer" not in state:
                state["swa_buffer"] = torch.zeros_like(p.data)
            buf = state["swa_buffer"]
            virtual_decay = 1 / float(group["n_avg"] + 1)
            buf.add_((p.data - buf) * virtual_decay)
        group["n_avg"] += 1

    def update_swa(self):
        for group in self.param_groups:
            self.update_swa_group(group)

    def swap_swa_sgd(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "swa_buffer" not in state:
                    warnings.warn(f"SWA wasn't applied to param {p}; skipping it")
                    continue
                buf = state["swa_buffer"]
                tmp = torch.empty_like(p.data)
                tmp.copy_(p.data)
                p.data.copy_(buf)
                buf.copy_(tmp)

    def step(self, closure=None):
        self._reset_lr_to_swa()
        loss = self.optimizer.step(closure)
        for group in self.param_groups:
            group["step_counter"] += 1
            steps = group["step_counter"]
            if self._auto_mode and steps > self.swa_start and steps % self.swa_freq == 0:
                self.update_swa_group(group)
        return loss

    def state_dict(self):
        opt_state_dict = self.optimizer.state_dict()
        swa_state = {(id(k) if isinstance(k, torch.Tensor) else k): v for k, v in self.state.items()}
        return {"opt_state": opt_state_dict["state"], "swa_state": swa_state,
                "param_groups": opt_state_dict["param_groups"]}

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


# fp32: torchcontrib rounds (p - buf), the weight and the product separately; ours lerps (one rounding).
CONTRIB_TOL = dict(atol=1e-6, rtol=1e-5)


def _contrib_pair(swa_start=2, swa_freq=2, swa_lr=0.05, momentum=0.9):
    model, twin = twin_models()
    ours = SWA(torch.optim.SGD(param_groups(model), momentum=momentum), swa_start=swa_start, swa_freq=swa_freq,
               swa_lr=swa_lr)
    theirs = TorchcontribSWA(torch.optim.SGD(param_groups(twin), momentum=momentum), swa_start=swa_start,
                             swa_freq=swa_freq, swa_lr=swa_lr)
    return model, twin, ours, theirs


def _assert_same_swa(model, twin, ours, theirs, what):
    assert_same_params(model, twin, what)
    assert [int(g["n_avg"]) for g in ours.param_groups] == [g["n_avg"] for g in theirs.param_groups], what
    assert [g["step_counter"] for g in ours.param_groups] == [g["step_counter"] for g in theirs.param_groups]
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups], what
    for p, q in zip(model.parameters(), twin.parameters()):
        assert ("swa_buffer" in ours.state[p]) == ("swa_buffer" in theirs.state[q]), what
        if "swa_buffer" in theirs.state[q]:
            assert_close(ours.state[p]["swa_buffer"], theirs.state[q]["swa_buffer"], what=what, **CONTRIB_TOL)


@pytest.mark.parametrize("swa_lr", [None, 0.05])
def test_swa_matches_torchcontrib_port_auto_mode(swa_lr):
    model, twin, ours, theirs = _contrib_pair(swa_lr=swa_lr)
    data = make_data()
    for n in range(9):
        train_step(model, ours, data[n % BATCHES])
        train_step(twin, theirs, data[n % BATCHES])
        _assert_same_swa(model, twin, ours, theirs, f"step {n}")
    ours.swap_swa_sgd()
    theirs.swap_swa_sgd()
    for p, q in zip(model.parameters(), twin.parameters()):  # the averages, within their rounding
        assert_close(p, q, what="swapped", **CONTRIB_TOL)
    ours.swap_swa_sgd()
    theirs.swap_swa_sgd()
    _assert_same_swa(model, twin, ours, theirs, "swapped back")
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"opt_state", "swa_state", "param_groups"}


def test_swa_matches_torchcontrib_port_manual_mode_and_groups():
    model, twin, ours, theirs = _contrib_pair(swa_start=None, swa_freq=None, swa_lr=None)
    data = make_data()
    for n in range(6):
        train_step(model, ours, data[n % BATCHES])
        train_step(twin, theirs, data[n % BATCHES])
        if n % 2:
            ours.update_swa()
            theirs.update_swa()
        else:
            ours.update_swa_group(ours.param_groups[1])
            theirs.update_swa_group(theirs.param_groups[1])
        _assert_same_swa(model, twin, ours, theirs, f"step {n}")


def test_swa_loads_a_torchcontrib_checkpoint_and_continues_like_it():
    model, twin, _, theirs = _contrib_pair()
    data = make_data()
    for n in range(5):
        train_step(twin, theirs, data[n % BATCHES])
    blob = io.BytesIO()
    torch.save({"model": twin.state_dict(), "swa": theirs.state_dict()}, blob)
    blob.seek(0)
    checkpoint = torch.load(blob, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    ours = SWA(torch.optim.SGD(param_groups(model), momentum=0.9), swa_start=2, swa_freq=2, swa_lr=0.05)
    ours.load_state_dict(checkpoint["swa"])
    _assert_same_swa(model, twin, ours, theirs, "loaded")
    for n in range(5, 9):
        train_step(model, ours, data[n % BATCHES])
        train_step(twin, theirs, data[n % BATCHES])
        _assert_same_swa(model, twin, ours, theirs, f"step {n}")


def test_swa_validation_matches_torchcontrib():
    sgd = torch.optim.SGD(make_mlp().parameters(), lr=0.1)
    for kwargs in (dict(swa_start=-1, swa_freq=1), dict(swa_start=0, swa_freq=0),
                   dict(swa_start=0, swa_freq=1, swa_lr=-0.5)):
        with pytest.raises(ValueError):
            TorchcontribSWA(sgd, **kwargs)
        with pytest.raises(ValueError):
            SWA(sgd, **kwargs)
    for cls in (TorchcontribSWA, SWA):
        with pytest.warns(UserWarning, match="Casting swa_start, swa_freq to int"):
            swa = cls(sgd, swa_start=2.7, swa_freq=3.0)
        assert (swa.swa_start, swa.swa_freq) == (2, 3)


# ---------------------------------------------------------------------------- EMA's live settings
def test_ema_decay_warmup_and_every_are_live():
    model, twin = twin_models()
    data = make_data()
    optimizer = EMA(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    oracle = None
    for n in range(1, 9):
        if n == 4:
            optimizer.decay = 0.9  # takes effect at the next step
        if n == 6:
            optimizer.every = 2
        train_step(model, optimizer, data[n % BATCHES])
        train_step(twin, plain, data[n % BATCHES])
        current = float64_params(twin)
        if oracle is None:
            oracle = current
        elif n < 6 or n % 2 == 0:
            d = 0.5 if n < 4 else 0.9
            oracle = [torch.lerp(o, p, 1 - d) for o, p in zip(oracle, current)]
    for avg, exp in zip(optimizer.average_state_dict().values(), oracle):
        assert_close(avg, exp, what="live decay/every", **FP32_TOL)
    with pytest.raises(ValueError, match="decay"):
        optimizer.decay = 1.5
    with pytest.raises(ValueError, match="every"):
        optimizer.every = 0
    with pytest.raises(TypeError, match="warmup"):
        optimizer.warmup = 0.3
    optimizer.warmup = {"warmup_gamma": 2.0}
    assert optimizer.warmup == EMAWarmup(warmup_gamma=2.0)
    assert optimizer.decay == 0.9


def test_one_engine_per_optimizer_one_fused_call_per_step(monkeypatch):
    import swm_fused.engine as engine_module
    calls = []
    for op in ("ema_", "swa_", "any_nonfinite"):
        real = getattr(engine_module, op)
        monkeypatch.setattr(engine_module, op, lambda *a, _real=real, _op=op, **k: (calls.append(_op), _real(*a, **k))[1])
    model = make_mlp()
    for optimizer in (EMA(torch.optim.SGD(param_groups(model), lr=0.1), decay=0.9),
                      SWA(torch.optim.SGD(param_groups(model), lr=0.1), swa_start=0, swa_freq=1)):
        calls.clear()
        train_step(model, optimizer, make_data()[0])
        assert len(calls) == 2 and calls[0] == "any_nonfinite", calls  # two param groups, one call each
