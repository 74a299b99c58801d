"""swm_fused.swa_utils against torch.optim.swa_utils, run side by side on identical copies.

Each scenario builds one random model, deep-copies it twice, drives torch's
AveragedModel with one copy and ours with the other through the same random
"training" (parameter noise plus a train-mode forward that moves BatchNorm
statistics), and compares the whole state_dict after every update.
"""
from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from copy import deepcopy
from typing import Dict, List, Optional
from unittest import mock

import pytest
import torch
import torch.optim.swa_utils as torch_swa
from torch import nn

import swm_fused
import swm_fused.swa_utils as ours_swa
from swm_fused import ops

from _helpers import FLOAT64_TOLERANCES, assert_close, bits, cpu_backends

IN_FEATURES = 6


class SmallNet(nn.Module):
    """Linear + BatchNorm layers, plus a float64 parameter and buffer that forward ignores,
    so averages see two dtypes and an integer buffer (num_batches_tracked)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(
            fc1=nn.Linear(IN_FEATURES, 8), bn1=nn.BatchNorm1d(8), act=nn.ReLU(),
            fc2=nn.Linear(8, 8), bn2=nn.BatchNorm1d(8), fc3=nn.Linear(8, 3))).to(dtype)
        self.extra = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.register_buffer("drift", torch.randn(4, dtype=torch.float64))

    def forward(self, x):
        return self.body(x)


def train_step(models: List[nn.Module]) -> None:
    """Apply one identical random change to every model: parameter and buffer noise, then a
    train-mode forward that updates the BatchNorm running statistics."""
    first = models[0]
    dtype = first.body.fc1.weight.dtype
    x = torch.randn(7, IN_FEATURES).to(dtype)
    noise = [torch.randn_like(p) * 0.3 for p in first.parameters()]
    drift = torch.randn_like(first.drift)
    for model in models:
        with torch.no_grad():
            for p, n in zip(model.parameters(), noise):
                p.add_(n)
            model.drift.add_(drift)
            model.train()
            model(x)


def twins(model: Optional[nn.Module] = None):
    """Two identical deep copies of one fresh random model."""
    model = model if model is not None else SmallNet()
    return deepcopy(model), deepcopy(model)


def scale_of(t: torch.Tensor) -> float:
    return max(t.detach().abs().max().item(), 1e-30) if t.numel() else 1.0


def assert_same_average(ours: nn.Module, theirs: nn.Module, eps_multiple: float,
                        float64_eps_multiple: Optional[float] = None) -> None:
    """Same keys, dtypes, devices and shapes; integer entries equal; floating entries bitwise equal
    when eps_multiple == 0, else within eps_multiple * eps(dtype) * max|theirs|.
    float64_eps_multiple, when given, is the bound for float64 entries, in float32 eps."""
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key, theirs_t in sd_theirs.items():
        ours_t = sd_ours[key]
        assert (ours_t.dtype, ours_t.device, ours_t.shape) == (theirs_t.dtype, theirs_t.device, theirs_t.shape), key
        if float64_eps_multiple is not None and theirs_t.dtype == torch.float64:
            atol = float64_eps_multiple * torch.finfo(torch.float32).eps * scale_of(theirs_t)
            assert_close(ours_t, theirs_t, atol=atol, rtol=0.0, what=key)
        elif eps_multiple == 0 or not theirs_t.is_floating_point():
            assert torch.equal(bits(ours_t), bits(theirs_t)), f"{key}: not bitwise equal to torch"
        else:
            atol = eps_multiple * torch.finfo(theirs_t.dtype).eps * scale_of(theirs_t)
            assert_close(ours_t, theirs_t, atol=atol, rtol=0.0, what=key)


def backend_tolerance(backend: str) -> float:
    """The reference backend computes lerp exactly as torch does; others may use an fma form."""
    return 0.0 if backend == "reference" else 4.0


# torch's default SWA on CPU computes a + (b - a) / (n + 1) (three roundings, ours one lerp); the
# two drift apart by up to ~3.3 eps * max|x| over five updates (seen over 300 seeds), never more than
# a few eps since each step contracts the old difference.
TORCH_CPU_SWA_EPS = 8.0


def poison(module: nn.Module) -> None:
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))


# ----------------------------------------------------------------------------- AveragedModel

@pytest.mark.parametrize("use_buffers", [False, True])
def test_default_swa_matches_torch_bit_for_bit(use_buffers):
    """Default SWA on the CPU: torch computes a + (b - a) / (n + 1) per tensor; ours runs the same
    formula with the same roundings (three _foreach calls), so the whole state_dict is bitwise torch's."""
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, use_buffers=use_buffers)
    avg_o = ours_swa.AveragedModel(model_o, use_buffers=use_buffers)
    for _ in range(5):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
        assert_same_average(avg_o, avg_t, eps_multiple=0)
    assert avg_o.n_averaged.dtype == torch.long and avg_o.n_averaged.shape == ()
    assert avg_o.n_averaged.item() == avg_t.n_averaged.item() == 5
    if not use_buffers:  # buffers follow the model, bit for bit
        for (name, b_avg), (_, b_model) in zip(avg_o.module.named_buffers(), model_o.named_buffers()):
            assert torch.equal(bits(b_avg), bits(b_model)), name


@pytest.mark.parametrize("backend", cpu_backends())
def test_swa_matches_torch_foreach_lerp(backend):
    """torch's get_swa_multi_avg_fn runs _foreach_lerp_ with weight 1/(n+1): the same math as ours,
    except that torch rounds the weight to float32 even for float64 tensors (ours keeps it in float64)."""
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, multi_avg_fn=torch_swa.get_swa_multi_avg_fn())
    avg_fn = ours_swa.AveragedModel(model_o, multi_avg_fn=ours_swa.get_swa_multi_avg_fn())
    with swm_fused.use_backend(backend):
        for _ in range(5):
            train_step([model_t, model_o])
            avg_t.update_parameters(model_t)
            avg_fn.update_parameters(model_o)
            assert_same_average(avg_fn, avg_t, backend_tolerance(backend), float64_eps_multiple=4.0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_matches_torch(backend, use_buffers):
    decay = 0.5 + 0.49 * torch.rand(()).item()
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, multi_avg_fn=torch_swa.get_ema_multi_avg_fn(decay),
                                    use_buffers=use_buffers)
    avg_o = ours_swa.AveragedModel(model_o, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(decay),
                                   use_buffers=use_buffers)
    with swm_fused.use_backend(backend):
        for _ in range(6):
            train_step([model_t, model_o])
            avg_t.update_parameters(model_t)
            avg_o.update_parameters(model_o)
            assert_same_average(avg_o, avg_t, backend_tolerance(backend))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_swa_multi_avg_fn_with_integer_buffers(use_buffers):
    """Ours handles num_batches_tracked like torch's default CPU path (torch's own
    get_swa_multi_avg_fn raises on integer buffers)."""
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, use_buffers=use_buffers)
    avg_o = ours_swa.AveragedModel(model_o, multi_avg_fn=ours_swa.get_swa_multi_avg_fn(), use_buffers=use_buffers)
    for _ in range(4):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
    # get_swa_multi_avg_fn lerps with a float32 weight (torch's own arithmetic), torch's default divides
    assert_same_average(avg_o, avg_t, eps_multiple=TORCH_CPU_SWA_EPS, float64_eps_multiple=4.0)


def test_default_paths_run_through_fused_ops():
    """With dtype= (a higher-precision average): one fused call per update over every floating tensor;
    integer buffers stay outside. (Without dtype= the CPU runs torch's own _foreach arithmetic.)"""
    model = SmallNet(torch.bfloat16)
    n_float = sum(1 for _ in model.parameters()) + sum(1 for b in model.buffers() if b.is_floating_point())
    swa_model = ours_swa.AveragedModel(model, use_buffers=True, dtype=torch.float32)
    ema_model = ours_swa.AveragedModel(model, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.9), use_buffers=True,
                                       dtype=torch.float32)
    with mock.patch.object(ops, "swa_", wraps=ops.swa_) as swa_spy, \
            mock.patch.object(ops, "ema_", wraps=ops.ema_) as ema_spy:
        for _ in range(3):
            train_step([model])
            swa_model.update_parameters(model)
            ema_model.update_parameters(model)
    assert swa_spy.call_count == 2 and ema_spy.call_count == 2  # the first update is a copy
    for call in swa_spy.call_args_list + ema_spy.call_args_list:
        assert len(call.args[0]) == n_float
    assert isinstance(swa_spy.call_args.args[2], torch.Tensor)  # the count stays on the device


@pytest.mark.parametrize("fn", ["swa", "ema", "avg_fn"])
@pytest.mark.parametrize("use_buffers", [False, True])
def test_first_update_is_a_copy(fn, use_buffers):
    kwargs_t = {"swa": {}, "ema": {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.7)},
                "avg_fn": {"avg_fn": torch_swa.get_ema_avg_fn(0.7)}}[fn]
    kwargs_o = {"swa": {}, "ema": {"multi_avg_fn": ours_swa.get_ema_multi_avg_fn(0.7)},
                "avg_fn": {"avg_fn": ours_swa.get_ema_avg_fn(0.7)}}[fn]
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, use_buffers=use_buffers, **kwargs_t)
    avg_o = ours_swa.AveragedModel(model_o, use_buffers=use_buffers, **kwargs_o)
    train_step([model_t, model_o])
    poison(avg_t)
    poison(avg_o)
    avg_t.update_parameters(model_t)
    avg_o.update_parameters(model_o)
    assert_same_average(avg_o, avg_t, eps_multiple=0)
    for (name, avg), (_, src) in zip(avg_o.module.state_dict().items(), model_o.state_dict().items()):
        assert torch.equal(bits(avg), bits(src)), name
    assert avg_o.n_averaged.item() == 1


@pytest.mark.parametrize("use_buffers", [False, True])
def test_custom_avg_fn_called_like_torch(use_buffers):
    calls: Dict[str, list] = {"torch": [], "ours": []}

    def make_avg_fn(log):
        def avg_fn(avg, current, n):
            log.append((tuple(avg.shape), avg.dtype, current.dtype, avg.requires_grad, n.item(), n.dtype, n.device))
            return (avg * 3 + current) / 4 - n * 1e-3
        return avg_fn

    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, avg_fn=make_avg_fn(calls["torch"]), use_buffers=use_buffers)
    avg_o = ours_swa.AveragedModel(model_o, avg_fn=make_avg_fn(calls["ours"]), use_buffers=use_buffers)
    for _ in range(4):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
        assert_same_average(avg_o, avg_t, eps_multiple=0)
    assert calls["ours"] == calls["torch"] and calls["ours"]


@pytest.mark.parametrize("use_buffers", [False, True])
def test_custom_multi_avg_fn_called_like_torch(use_buffers):
    calls: Dict[str, list] = {"torch": [], "ours": []}

    def make_multi_avg_fn(log):
        def multi_avg_fn(avgs, currents, n):
            log.append(([tuple(a.shape) for a in avgs], avgs[0].dtype, [c.dtype for c in currents],
                        n.item(), n.dtype, n.device))
            for avg, current in zip(avgs, currents):
                avg.copy_(avg * 0.25 + current * 0.75 + n)
        return multi_avg_fn

    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, multi_avg_fn=make_multi_avg_fn(calls["torch"]), use_buffers=use_buffers)
    avg_o = ours_swa.AveragedModel(model_o, multi_avg_fn=make_multi_avg_fn(calls["ours"]), use_buffers=use_buffers)
    for _ in range(4):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
        assert_same_average(avg_o, avg_t, eps_multiple=0)
    assert calls["ours"] == calls["torch"] and len(calls["ours"]) >= 6  # float32 + float64 (+ int64) groups


@pytest.mark.parametrize("which", ["ema", "swa"])
def test_get_avg_fns_match_torch(which):
    decay = 0.5 + 0.49 * torch.rand(()).item()
    fn_t = torch_swa.get_ema_avg_fn(decay) if which == "ema" else torch_swa.get_swa_avg_fn()
    fn_o = ours_swa.get_ema_avg_fn(decay) if which == "ema" else ours_swa.get_swa_avg_fn()
    avg, cur = torch.randn(33), torch.randn(33)
    for n in (3, torch.tensor(3)):
        assert torch.equal(bits(fn_o(avg, cur, n)), bits(fn_t(avg, cur, n)))
    pickle.loads(pickle.dumps(fn_o))  # torch's are closures and cannot be pickled

    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, avg_fn=fn_t)
    avg_o = ours_swa.AveragedModel(model_o, avg_fn=fn_o)
    for _ in range(4):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
        assert_same_average(avg_o, avg_t, eps_multiple=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_multi_avg_fns_called_directly_match_torch(backend):
    decay = 0.5 + 0.49 * torch.rand(()).item()
    avgs = [torch.randn(17), torch.randn(4, 3), torch.randint(0, 100, (3,))]
    currents = [torch.randn(17), torch.randn(4, 3), torch.randint(0, 100, (3,))]
    with swm_fused.use_backend(backend):
        for n in (4, torch.tensor(4)):
            for fn_t, fn_o, floats_only in [
                    (torch_swa.get_ema_multi_avg_fn(decay), ours_swa.get_ema_multi_avg_fn(decay), False),
                    (torch_swa.get_swa_multi_avg_fn(), ours_swa.get_swa_multi_avg_fn(), True)]:
                # torch groups by dtype before calling; its SWA raises on integer tensors with a tensor count
                groups = [avgs[:2], avgs[2:]] if not floats_only else [avgs[:2]]
                cur_groups = [currents[:2], currents[2:]] if not floats_only else [currents[:2]]
                out_t = [[a.clone() for a in g] for g in groups]
                out_o = [[a.clone() for a in g] for g in groups]
                for g_t, g_o, cur in zip(out_t, out_o, cur_groups):
                    fn_t(g_t, cur, n)
                    fn_o(g_o, cur, n)
                    for a_o, a_t in zip(g_o, g_t):
                        if backend_tolerance(backend) == 0 or not a_t.is_floating_point():
                            assert torch.equal(bits(a_o), bits(a_t))
                        else:
                            assert_close(a_o, a_t, atol=4 * torch.finfo(a_t.dtype).eps * scale_of(a_t), rtol=0)
    pickle.loads(pickle.dumps(ours_swa.get_ema_multi_avg_fn(decay)))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_decay_errors_match_torch(bad):
    for name in ("get_ema_avg_fn", "get_ema_multi_avg_fn"):
        with pytest.raises(ValueError) as err_t:
            getattr(torch_swa, name)(bad)
        with pytest.raises(ValueError) as err_o:
            getattr(ours_swa, name)(bad)
        assert str(err_o.value) == str(err_t.value)


def test_avg_fn_and_multi_avg_fn_together_raise_like_torch():
    model = SmallNet()
    with pytest.raises(AssertionError) as err_t:
        torch_swa.AveragedModel(model, avg_fn=torch_swa.get_swa_avg_fn(), multi_avg_fn=torch_swa.get_swa_multi_avg_fn())
    with pytest.raises(AssertionError) as err_o:
        ours_swa.AveragedModel(model, avg_fn=ours_swa.get_swa_avg_fn(), multi_avg_fn=ours_swa.get_swa_multi_avg_fn())
    assert str(err_o.value) == str(err_t.value)


# ----------------------------------------------------------------------------- persistence

def test_state_dict_save_load_round_trip(tmp_path):
    model_t, model_o = twins()
    decay = 0.8
    avg_t = torch_swa.AveragedModel(model_t, multi_avg_fn=torch_swa.get_ema_multi_avg_fn(decay))
    avg_o = ours_swa.AveragedModel(model_o, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(decay))
    for _ in range(3):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
    assert list(avg_o.state_dict()) == list(avg_t.state_dict())
    assert all(k.startswith("module.") for k in avg_o.state_dict() if k != "n_averaged")
    path = tmp_path / "avg.pt"
    torch.save(avg_o.state_dict(), path)

    # A fresh average (n_averaged == 0) must not copy on its next update after loading n_averaged == 3.
    restored = ours_swa.AveragedModel(SmallNet(), multi_avg_fn=ours_swa.get_ema_multi_avg_fn(decay))
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert_same_average(restored, avg_t, eps_multiple=0)
    # torch's state_dict loads into ours and ours into torch's.
    from_torch = ours_swa.AveragedModel(SmallNet(), multi_avg_fn=ours_swa.get_ema_multi_avg_fn(decay))
    from_torch.load_state_dict(avg_t.state_dict())
    into_torch = torch_swa.AveragedModel(SmallNet(), multi_avg_fn=torch_swa.get_ema_multi_avg_fn(decay))
    into_torch.load_state_dict(torch.load(path, weights_only=True))
    for _ in range(3):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        for avg in (restored, from_torch):
            avg.update_parameters(model_o)
            assert_same_average(avg, avg_t, eps_multiple=0)
        into_torch.update_parameters(model_o)
        assert_same_average(into_torch, avg_t, eps_multiple=0)


def test_loading_a_zero_count_makes_the_next_update_a_copy():
    model_t, model_o = twins()
    fresh_state = ours_swa.AveragedModel(model_o).state_dict()
    avg_t = torch_swa.AveragedModel(model_t)
    avg_o = ours_swa.AveragedModel(model_o)
    for _ in range(3):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
    avg_t.load_state_dict(fresh_state)
    avg_o.load_state_dict(fresh_state)
    train_step([model_t, model_o])
    poison(avg_t)
    poison(avg_o)
    avg_t.update_parameters(model_t)
    avg_o.update_parameters(model_o)
    assert_same_average(avg_o, avg_t, eps_multiple=0)
    assert avg_o.n_averaged.item() == 1


@pytest.mark.parametrize("updates_before_pickle", [0, 3])
def test_pickling(updates_before_pickle):
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t)
    avg_o = ours_swa.AveragedModel(model_o)
    ema_o = ours_swa.AveragedModel(deepcopy(model_o), multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.9))
    for _ in range(updates_before_pickle):
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
    avg_t = pickle.loads(pickle.dumps(avg_t))
    avg_o = pickle.loads(pickle.dumps(avg_o))
    assert isinstance(avg_o, ours_swa.AveragedModel)
    assert pickle.loads(pickle.dumps(ema_o)).multi_avg_fn.decay == 0.9
    assert_same_average(avg_o, avg_t, eps_multiple=TORCH_CPU_SWA_EPS)
    train_step([model_t, model_o])
    if updates_before_pickle == 0:  # the unpickled average still knows its first update is a copy
        poison(avg_t)
        poison(avg_o)
    avg_t.update_parameters(model_t)
    avg_o.update_parameters(model_o)
    assert_same_average(avg_o, avg_t, eps_multiple=TORCH_CPU_SWA_EPS)
    assert avg_o.n_averaged.item() == updates_before_pickle + 1


# ----------------------------------------------------------------------------- dtype= option

@pytest.mark.parametrize("mode", ["swa", "ema"])
@pytest.mark.parametrize("use_buffers", [False, True])
def test_fp32_average_of_bf16_model(mode, use_buffers):
    """An fp32 average of a bf16 model matches float64 math on the bf16 snapshots; torch's bf16
    average of the same model is far less accurate."""
    decay = 0.9
    model = SmallNet(torch.bfloat16)
    multi_t = torch_swa.get_ema_multi_avg_fn(decay) if mode == "ema" else None
    multi_o = ours_swa.get_ema_multi_avg_fn(decay) if mode == "ema" else None
    avg_t = torch_swa.AveragedModel(model, multi_avg_fn=multi_t, use_buffers=use_buffers)
    avg_o = ours_swa.AveragedModel(model, multi_avg_fn=multi_o, use_buffers=use_buffers, dtype=torch.float32)
    oracle: Dict[str, torch.Tensor] = {}
    averaged_names = [n for n, _ in model.named_parameters()]
    if use_buffers:
        averaged_names += [n for n, b in model.named_buffers() if b.is_floating_point()]
    for step in range(6):
        train_step([model])
        avg_t.update_parameters(model)
        avg_o.update_parameters(model)
        state = model.state_dict()
        for name in averaged_names:
            x = state[name].double()
            if step == 0:
                oracle[name] = x.clone()
            else:
                weight = 1 - decay if mode == "ema" else 1 / (step + 1)
                oracle[name] += weight * (x - oracle[name])
    ours_state, torch_state = avg_o.module.state_dict(), avg_t.module.state_dict()
    atol, rtol = FLOAT64_TOLERANCES[torch.float32]
    for name, expected in oracle.items():
        assert ours_state[name].dtype == torch.float32, name
        assert_close(ours_state[name], expected, atol=atol * scale_of(expected), rtol=rtol, what=name)
    our_err = max((ours_state[n].double() - e).abs().max().item() for n, e in oracle.items())
    torch_err = max((torch_state[n].double() - e).abs().max().item() for n, e in oracle.items())
    assert our_err * 100 < torch_err
    assert model.body.fc1.weight.dtype == torch.bfloat16
    assert ours_state["body.bn1.num_batches_tracked"].dtype == torch.long
    assert avg_o.n_averaged.dtype == torch.long and avg_o.n_averaged.item() == 6
    assert avg_o(torch.randn(3, IN_FEATURES)).dtype == torch.float32


def test_dtype_casts_model_tensors_for_user_functions():
    seen = []

    def multi_avg_fn(avgs, currents, n):
        seen.append(({a.dtype for a in avgs}, {c.dtype for c in currents}))
        torch._foreach_lerp_(avgs, currents, 0.5)

    model = SmallNet(torch.bfloat16)
    avg = ours_swa.AveragedModel(model, multi_avg_fn=multi_avg_fn, dtype=torch.float32)
    for _ in range(2):
        train_step([model])
        avg.update_parameters(model)
    assert seen and all(a == c for a, c in seen)
    assert {torch.float32} in [a for a, _ in seen]


def test_bad_dtype_raises():
    with pytest.raises(TypeError, match="dtype"):
        ours_swa.AveragedModel(SmallNet(), dtype=torch.int32)


# ----------------------------------------------------------------------------- pairing by name

class Renamed(nn.Module):
    def __init__(self, source: SmallNet, rename: Dict[str, str]):
        super().__init__()
        self.body = nn.Sequential(OrderedDict((rename.get(k, k), deepcopy(m)) for k, m in source.body.named_children()))
        self.extra = deepcopy(source.extra)
        self.register_buffer("drift", source.drift.clone())


@pytest.mark.parametrize("case", ["renamed", "missing_in_model", "extra_in_model", "reshaped", "buffer"])
def test_name_mismatch_raises_before_writing(case):
    model = SmallNet()
    avg = ours_swa.AveragedModel(model)
    avg.update_parameters(model)
    other = deepcopy(model)
    expected_name = {"renamed": "body.fc2.weight", "missing_in_model": "extra", "extra_in_model": "surplus",
                     "reshaped": "extra", "buffer": "drift"}[case]
    if case == "renamed":
        other = Renamed(model, {"fc2": "fc_two"})
    elif case == "missing_in_model":
        del other.extra
    elif case == "extra_in_model":
        other.surplus = nn.Parameter(torch.randn(2))
    elif case == "reshaped":
        other.extra = nn.Parameter(torch.randn(6, dtype=torch.float64))
    else:
        other.drift = torch.randn(4, dtype=torch.float64)
        del other._buffers["drift"]
        other.register_buffer("drift_renamed", torch.randn(4, dtype=torch.float64))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in avg.state_dict().items()}
    with pytest.raises(ValueError, match=f"'{expected_name}'"):
        avg.update_parameters(other)
    for key, value in avg.state_dict().items():
        assert torch.equal(bits(value), bits(before[key])), f"{key} was written"


def test_wrapped_model_pairs_through_data_parallel():
    model_o = SmallNet()
    plain = ours_swa.AveragedModel(model_o)
    wrapped = ours_swa.AveragedModel(model_o)
    for _ in range(3):
        train_step([model_o])
        plain.update_parameters(model_o)
        wrapped.update_parameters(nn.DataParallel(model_o))
    assert_same_average(wrapped, plain, eps_multiple=0)


# ----------------------------------------------------------------------------- host syncs

SYNCING_METHODS = ("__bool__", "item", "__int__", "__float__", "__index__", "tolist")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts Python-level reads of tensor values (each one a device sync on a GPU)."""
    counts = {"n": 0}
    for name in SYNCING_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_cpu_update_reads_n_averaged_once_like_torch(host_reads):
    """On the CPU reading n_averaged is free (no device to wait for): ours reads it once per update
    and per device, to decide the first update's copy; a GPU update never reads it (next test)."""
    model = SmallNet()
    averages = [ours_swa.AveragedModel(model, use_buffers=True),
                ours_swa.AveragedModel(model, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.9)),
                ours_swa.AveragedModel(model, multi_avg_fn=ours_swa.get_swa_multi_avg_fn(), use_buffers=True)]
    for _ in range(3):
        train_step([model])
        for avg in averages:
            before = host_reads["n"]
            avg.update_parameters(model)
            assert host_reads["n"] - before == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_per_update_on_cuda():
    model = SmallNet().cuda()
    averages = [ours_swa.AveragedModel(model, use_buffers=True),
                ours_swa.AveragedModel(model, multi_avg_fn=ours_swa.get_ema_multi_avg_fn(0.9), dtype=torch.float32)]
    assert all(a.n_averaged.device.type == "cuda" for a in averages)
    cpu_model = deepcopy(model).cpu()
    cpu_average = ours_swa.AveragedModel(cpu_model, use_buffers=True)
    train_step([model, cpu_model])
    for avg in averages:
        avg.update_parameters(model)
    cpu_average.update_parameters(cpu_model)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    for _ in range(3):
        train_step([model, cpu_model])
        torch.cuda.set_sync_debug_mode("error")
        try:
            for avg in averages:
                avg.update_parameters(model)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        cpu_average.update_parameters(cpu_model)
    assert averages[0].n_averaged.item() == 4
    for (name, on_gpu), (_, on_cpu) in zip(averages[0].state_dict().items(), cpu_average.state_dict().items()):
        atol = 4 * torch.finfo(on_cpu.dtype).eps * scale_of(on_cpu) if on_cpu.is_floating_point() else 0
        assert_close(on_gpu, on_cpu, atol=atol, rtol=0, what=name)


# ----------------------------------------------------------------------------- update_bn

@pytest.mark.parametrize("batch_form", ["tensor", "tuple_x", "list_x_y"])
def test_update_bn_matches_torch_and_batch_statistics(batch_form):
    model = nn.Sequential(nn.BatchNorm1d(IN_FEATURES), nn.Linear(IN_FEATURES, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    avg_t = torch_swa.AveragedModel(deepcopy(model))
    avg_o = ours_swa.AveragedModel(deepcopy(model))
    batches = [torch.randn(8, IN_FEATURES) * 2 + 1 for _ in range(5)]
    wrap = {"tensor": lambda x: x, "tuple_x": lambda x: (x,), "list_x_y": lambda x: [x, torch.randn(8)]}[batch_form]
    loader = [wrap(x) for x in batches]
    avg_t.eval()
    avg_o.eval()
    torch_swa.update_bn(loader, avg_t)
    ours_swa.update_bn(loader, avg_o, device="cpu")
    assert_same_average(avg_o, avg_t, eps_multiple=0)
    assert not avg_o.training and avg_o.module[0].momentum == model[0].momentum
    bn = avg_o.module[0]
    data = torch.stack(batches).double()
    atol, rtol = FLOAT64_TOLERANCES[torch.float32]
    assert_close(bn.running_mean, data.mean(dim=1).mean(dim=0), atol=atol, rtol=rtol, what="running_mean")
    assert_close(bn.running_var, data.var(dim=1).mean(dim=0), atol=atol, rtol=rtol, what="running_var")
    assert bn.num_batches_tracked.item() == len(batches)


# ----------------------------------------------------------------------------- SWALR

def make_optimizer(lrs: List[float]) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.randn(2))], "lr": lr} for lr in lrs])


def swalr_oracle(lr0: float, swa_lr: float, step: int, anneal_epochs: int, strategy: str) -> float:
    """SWALR's closed form: anneal from the initial lr to swa_lr over anneal_epochs steps."""
    t = 1.0 if anneal_epochs == 0 else min(1.0, step / anneal_epochs)
    alpha = t if strategy == "linear" else (1 - math.cos(math.pi * t)) / 2
    return swa_lr * alpha + lr0 * (1 - alpha)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 5])
@pytest.mark.parametrize("per_group", [False, True])
def test_swalr_sequence_matches_torch(strategy, anneal_epochs, per_group):
    lrs = [0.05 + 0.5 * torch.rand(()).item() for _ in range(2)]
    swa_lr = [0.01 * (1 + torch.rand(()).item()) for _ in range(2)]
    swa_arg = swa_lr if per_group else swa_lr[0]
    swa_lr = swa_lr if per_group else [swa_lr[0]] * 2
    opt_t, opt_o = make_optimizer(lrs), make_optimizer(lrs)
    sched_t = torch_swa.SWALR(opt_t, swa_arg, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    sched_o = ours_swa.SWALR(opt_o, swa_arg, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    for step in range(anneal_epochs + 4):
        got = [g["lr"] for g in opt_o.param_groups]
        assert got == [g["lr"] for g in opt_t.param_groups]
        assert sched_o.get_last_lr() == sched_t.get_last_lr()
        for lr, lr0, target in zip(got, lrs, swa_lr):
            assert math.isclose(lr, swalr_oracle(lr0, target, step, anneal_epochs, strategy), rel_tol=1e-12)
        opt_t.step()
        opt_o.step()
        sched_t.step()
        sched_o.step()


@pytest.mark.parametrize("kwargs", [
    {"swa_lr": 0.1, "anneal_strategy": "exp"},
    {"swa_lr": 0.1, "anneal_epochs": -1},
    {"swa_lr": 0.1, "anneal_epochs": 2.5},
    {"swa_lr": [0.1, 0.2, 0.3]},
])
def test_swalr_errors_match_torch(kwargs):
    with pytest.raises(Exception) as err_t:
        torch_swa.SWALR(make_optimizer([0.1, 0.2]), **kwargs)
    with pytest.raises(Exception) as err_o:
        ours_swa.SWALR(make_optimizer([0.1, 0.2]), **kwargs)
    assert type(err_o.value) is type(err_t.value) is ValueError
    assert str(err_o.value) == str(err_t.value)


def test_public_names_match_torch():
    assert sorted(ours_swa.__all__) == sorted(torch_swa.__all__)
    assert issubclass(ours_swa.AveragedModel, nn.Module)
    assert swm_fused.swa_utils is ours_swa


# ----------------------------------------------------------------------------- n_averaged decides

@pytest.mark.parametrize("fn", ["swa", "ema", "swa_multi"])
def test_n_averaged_fill_zero_restarts_like_torch(fn):
    """torch reads n_averaged at every update: zeroing it in place makes the next update a copy."""
    kwargs_t = {"swa": {}, "ema": {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.7)},
                "swa_multi": {"multi_avg_fn": torch_swa.get_swa_multi_avg_fn()}}[fn]
    kwargs_o = {"swa": {}, "ema": {"multi_avg_fn": ours_swa.get_ema_multi_avg_fn(0.7)},
                "swa_multi": {"multi_avg_fn": ours_swa.get_swa_multi_avg_fn()}}[fn]
    model_t, model_o = twins()
    avg_t = torch_swa.AveragedModel(model_t, **kwargs_t)
    avg_o = ours_swa.AveragedModel(model_o, **kwargs_o)
    for step in range(6):
        if step == 3:
            avg_t.n_averaged.fill_(0)
            avg_o.n_averaged.fill_(0)
        train_step([model_t, model_o])
        avg_t.update_parameters(model_t)
        avg_o.update_parameters(model_o)
        if fn == "swa_multi":  # torch rounds the weight 1/(n+1) to float32 even for float64 tensors
            assert_same_average(avg_o, avg_t, 4.0, float64_eps_multiple=4.0)
        else:
            assert_same_average(avg_o, avg_t, eps_multiple=0)
        if step == 3:  # the restart copied the model
            for (name, a), (_, p) in zip(avg_o.module.named_parameters(), model_o.named_parameters()):
                assert torch.equal(bits(a), bits(p)), name
    assert avg_o.n_averaged.item() == 3


@pytest.mark.parametrize("fn", ["swa", "ema"])
def test_in_place_loading_then_update_averages_like_torch(fn):
    """torch.distributed.checkpoint.load fills state_dict() tensors in place; the next update must
    average (n_averaged > 0 now), not copy."""
    kwargs_t = {} if fn == "swa" else {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.8)}
    kwargs_o = {} if fn == "swa" else {"multi_avg_fn": ours_swa.get_ema_multi_avg_fn(0.8)}
    model_t, model_o = twins()
    source = torch_swa.AveragedModel(deepcopy(model_t), **kwargs_t)
    for _ in range(3):
        train_step([model_t, model_o])
        source.update_parameters(model_t)
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    avg_t = torch_swa.AveragedModel(SmallNet(), **kwargs_t)
    avg_o = ours_swa.AveragedModel(SmallNet(), **kwargs_o)
    avg_o.update_parameters(model_o)  # ours has run (and paired) before the load
    avg_o.n_averaged.zero_()
    for avg in (avg_t, avg_o):
        with torch.no_grad():
            for key, tensor in avg.state_dict().items():
                tensor.copy_(saved[key])
    train_step([model_t, model_o])
    avg_t.update_parameters(model_t)
    avg_o.update_parameters(model_o)
    assert_same_average(avg_o, avg_t, eps_multiple=0)
    assert avg_o.n_averaged.item() == 4
    moved = any(not torch.equal(a, p) for a, p in zip(avg_o.module.parameters(), model_o.parameters()))
    assert moved, "the update copied the model instead of averaging"
