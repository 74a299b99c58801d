"""WeightAverager: EMA/SWA against float64 oracles, timm warmup, parametrized modules, swapping,
exact resume, non-finite steps, and memory (no parameter-sized temporaries)."""
from __future__ import annotations

import io
import math
import random
from typing import Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import swm_fused
import swm_fused.engine as engine_module
from swm_fused.averager import EMAWarmup, WeightAverager

from _helpers import assert_close, bits

# fp32 average after ~30 updates vs exact float64 math: a few fp32 roundings per update.
FP32_TOL = dict(atol=2e-6, rtol=2e-5)


def timm_decay(step: int, decay: float, update_after_step: int = 0, warmup_gamma: float = 1.0,
               warmup_power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """Independent copy of timm ModelEmaV3.get_decay(step) with use_warmup=True, in float64 numpy-free math."""
    k = step - update_after_step - 1
    if k <= 0:
        return 0.0
    value = 1.0 - math.pow(1.0 + k / warmup_gamma, -warmup_power)
    return max(min(value, decay), min_decay)


def make_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 7), nn.Linear(7, 5, bias=False)).to(dtype)


@torch.no_grad()
def random_walk(model: nn.Module, scale: float = 0.05) -> None:
    """One fake training step: every parameter moves by fresh noise."""
    for p in model.parameters():
        p.add_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * scale)


def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    return {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}


def oracle_run(snapshots: List[Dict[str, Tensor]], mode: str, decay: float = 0.0, start: int = 0, every: int = 1,
               warmup: Optional[dict] = None, skip_steps=()) -> Dict[str, Tensor]:
    """float64 EMA/SWA over per-step snapshots (step n = snapshots[n-1]), the first applied update copying."""
    avg: Optional[Dict[str, Tensor]] = None
    count = 0
    for n, snap in enumerate(snapshots, start=1):
        if n <= start or (n - start) % every or n in skip_steps:
            continue
        if avg is None:
            avg = {k: v.clone() for k, v in snap.items()}
        elif mode == "ema":
            d = timm_decay(n, decay, **warmup) if warmup is not None else decay
            avg = {k: d * avg[k] + (1 - d) * snap[k] for k in avg}
        else:
            avg = {k: avg[k] + (snap[k] - avg[k]) / (count + 1) for k in avg}
        count += 1
    assert avg is not None
    return avg


# --------------------------------------------------------------------------- warmup formula
def test_warmup_decay_matches_timm_formula():
    for _ in range(20):
        fields = dict(update_after_step=random.randrange(0, 10), warmup_gamma=random.uniform(0.5, 5.0),
                      warmup_power=random.uniform(0.3, 1.0), min_decay=random.uniform(0.0, 0.5))
        decay = random.uniform(0.5, 0.9999)
        warmup = EMAWarmup(**fields)
        for step in list(range(0, 30)) + [random.randrange(30, 10**7) for _ in range(20)]:
            assert warmup.decay_at(step, decay) == pytest.approx(timm_decay(step, decay, **fields), rel=1e-15, abs=0)


def test_warmup_end_to_end_matches_timm_oracle():
    model = make_mlp(torch.bfloat16)
    fields = dict(update_after_step=2, warmup_gamma=1.5, warmup_power=0.75, min_decay=0.1)
    avg = WeightAverager(model, mode="ema", decay=0.95, warmup=fields)  # dict form
    assert avg.warmup == EMAWarmup(**fields)
    snaps = []
    for _ in range(25):
        random_walk(model)
        snaps.append(snapshot(model))
        avg.update()
    expected = oracle_run(snaps, "ema", decay=0.95, warmup=fields)
    for name, view in avg.average_state_dict().items():
        assert view.dtype == torch.float32
        assert_close(view, expected[name], what=name, **FP32_TOL)


def test_warmup_validation():
    with pytest.raises(ValueError, match="warmup_gamma"):
        EMAWarmup(warmup_gamma=0)
    with pytest.raises(ValueError, match="update_after_step"):
        EMAWarmup(update_after_step=-1)
    with pytest.raises(ValueError, match="min_decay"):
        EMAWarmup(min_decay=1.5)
    with pytest.raises(ValueError, match="warmup only applies"):
        WeightAverager(make_mlp(), mode="swa", warmup=EMAWarmup())
    with pytest.raises(TypeError, match="warmup"):
        WeightAverager(make_mlp(), warmup=0.5)


@pytest.mark.parametrize("given,expected", [(True, EMAWarmup()), (False, None), (None, None),
                                            ({"warmup_power": 0.75}, EMAWarmup(warmup_power=0.75)),
                                            (EMAWarmup(update_after_step=3), EMAWarmup(update_after_step=3))])
def test_warmup_forms_every_front_end_accepts(given, expected):
    assert EMAWarmup.coerce(given, "X") == expected
    assert WeightAverager(make_mlp(), warmup=given).warmup == expected
    with pytest.raises(TypeError, match="^X: warmup must be"):
        EMAWarmup.coerce("yes", "X")


# ------------------------------------------------------------------------ EMA / SWA oracles
@pytest.mark.parametrize("mode", ["ema", "swa"])
@pytest.mark.parametrize("start,every", [(0, 1), (3, 2), (0, 4)])
def test_average_matches_float64_oracle(mode, start, every):
    model = make_mlp(torch.bfloat16)
    decay = random.uniform(0.7, 0.95)
    avg = WeightAverager(model, mode=mode, decay=decay, start=start, every=every)
    snaps, applied = [], []
    for _ in range(20):
        random_walk(model)
        snaps.append(snapshot(model))
        applied.append(avg.update())
    assert applied == [n > start and (n - start) % every == 0 for n in range(1, 21)]
    assert avg.step == 20 and avg.n_averaged == sum(applied) and avg.skipped == 0
    expected = oracle_run(snaps, mode, decay=decay, start=start, every=every)
    got = avg.average_state_dict()
    assert list(got) == [n for n, _ in model.named_parameters()]
    for name in got:
        assert got[name].dtype == torch.float32
        assert_close(got[name], expected[name], what=f"{mode} {name}", **FP32_TOL)


def test_one_fused_call_per_update(monkeypatch):
    """One call into C++ per update, on lists bound once (swm_fused._C.bound_step: NaN check, average,
    counters), with no op of the ops layer in between; the first update binds the step."""
    from swm_fused import _C
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(30)])
    calls = []

    def counting(owner, op: str):
        real = getattr(owner, op)

        def wrapper(*args, **kwargs):
            calls.append(op)
            return real(*args, **kwargs)
        return wrapper

    for op in ("ema_", "swa_", "any_nonfinite", "step_", "bind_step"):
        monkeypatch.setattr(swm_fused.BoundLists, op, counting(swm_fused.BoundLists, op))
    for op in ("ema_", "swa_", "any_nonfinite"):  # the plain ops, as the engine calls them
        monkeypatch.setattr(swm_fused.engine, op, counting(swm_fused.engine, op))
    monkeypatch.setattr(_C, "bound_step", counting(_C, "bound_step"))
    for mode in ("ema", "swa"):
        avg = WeightAverager(model, mode=mode)
        calls.clear()
        avg.update()
        assert calls == ["bind_step", "bound_step"], calls
        for _ in range(3):
            calls.clear()
            avg.update()
            assert calls == ["bound_step"], calls
        assert avg.n_averaged == 4 and avg.engine.attempts == [4]


def test_dtype_none_keeps_float64_and_promotes_low_precision():
    model = {"a": torch.randn(5, dtype=torch.float64), "b": torch.randn(3).to(torch.float16),
             "c": torch.randn(2, 2)}
    avg = WeightAverager(model, mode="swa", dtype=None)
    dtypes = {n: t.dtype for n, t in avg.average_state_dict().items()}
    assert dtypes == {"a": torch.float64, "b": torch.float32, "c": torch.float32}
    first = {n: t.clone() for n, t in model.items()}
    avg.update()
    for t in model.values():
        t.add_(torch.randn_like(t))
    avg.update()
    for name, view in avg.average_state_dict().items():
        expected = (first[name].double() + model[name].double()) / 2
        tol = dict(atol=1e-14, rtol=1e-14) if name == "a" else FP32_TOL
        assert_close(view, expected, what=name, **tol)


def test_constructor_validation():
    with pytest.raises(ValueError, match="mode"):
        WeightAverager(make_mlp(), mode="mean")
    with pytest.raises(ValueError, match="decay"):
        WeightAverager(make_mlp(), decay=1.5)
    with pytest.raises(ValueError, match="every"):
        WeightAverager(make_mlp(), every=0)
    with pytest.raises(TypeError, match="start"):
        WeightAverager(make_mlp(), start=1.5)
    with pytest.raises(TypeError, match="dtype"):
        WeightAverager(make_mlp(), dtype=torch.int32)
    with pytest.raises(ValueError, match="no tensors"):
        WeightAverager(nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        WeightAverager([torch.randn(3)])


# ------------------------------------------------------------- parametrize and weight norm
class Symmetric(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def _parametrized_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4), nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    torch.nn.utils.parametrizations.weight_norm(model[2])
    torch.nn.utils.weight_norm(model[3])  # the old hook-based weight norm
    return model


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_parametrized_and_weight_norm_modules():
    model = _parametrized_model()
    twin = _parametrized_model()  # same structure: the oracle model
    names = [n for n, _ in model.named_parameters()]
    assert "0.parametrizations.weight.original" in names and "2.parametrizations.weight.original0" in names
    assert "3.weight_g" in names and "3.weight_v" in names
    avg = WeightAverager(model, mode="swa")
    assert avg.names == names
    snaps = []
    x = torch.randn(8, 6)
    for _ in range(6):
        random_walk(model, 0.2)
        model(x)  # old weight_norm recomputes `weight` in a forward pre-hook
        snaps.append(snapshot(model))
        avg.update()
    expected = oracle_run(snaps, "swa")
    for name, view in avg.average_state_dict().items():
        assert_close(view, expected[name], what=name, **FP32_TOL)

    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(expected[name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with avg.swapped():
        assert_close(model(x), twin(x), what="forward with the average", atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), bits(before[name])), name


# ------------------------------------------------------------------------ swapped / copy_to
def test_swapped_puts_average_in_and_restores_exactly_on_exception():
    model = make_mlp(torch.bfloat16)
    avg = WeightAverager(model, mode="ema", decay=0.8)
    for _ in range(5):
        random_walk(model)
        avg.update()
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = {n: t.clone() for n, t in avg.average_state_dict().items()}

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with avg.swapped():
            assert avg.is_swapped
            for name, p in model.named_parameters():
                assert p.dtype == torch.bfloat16
                assert torch.equal(p, average[name].to(torch.bfloat16)), name
            with pytest.raises(RuntimeError, match="already swapped"):
                with avg.swapped():
                    pass
            with pytest.raises(RuntimeError, match="swapped"):
                avg.update()
            with torch.no_grad():  # scribbling on the swapped weights must not leak out
                for p in model.parameters():
                    p.fill_(float("nan"))
            raise Boom()
    assert not avg.is_swapped
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), bits(training[name])), name
        assert p.requires_grad
    for name, view in avg.average_state_dict().items():
        assert torch.equal(bits(view), bits(average[name])), name


def test_copy_to_and_mismatch_errors():
    model = make_mlp()
    avg = WeightAverager(model, mode="swa")
    for _ in range(3):
        random_walk(model)
        avg.update()
    target = make_mlp(torch.float64)
    avg.copy_to(target)
    for name, p in target.named_parameters():
        assert torch.equal(p, avg.average_state_dict()[name].double()), name

    other = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 7), nn.Linear(7, 6, bias=False))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="'3.weight' has shape"):
        avg.copy_to(other)
    renamed = nn.Sequential(nn.Linear(13, 32), nn.Linear(32, 7), nn.Linear(7, 5, bias=False))
    with pytest.raises(ValueError, match="missing"):
        avg.copy_to(renamed)
    assert all(torch.equal(b, p) for b, p in zip(before, other.parameters()))


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("config", [
    dict(mode="ema", decay=0.9, warmup=EMAWarmup(update_after_step=1, warmup_gamma=2.0), start=2, every=2),
    dict(mode="ema", decay=0.97),
    dict(mode="swa", start=1, every=3),
], ids=["ema-warmup-gated", "ema", "swa-gated"])
def test_exact_resume(config):
    steps, nan_step = 24, random.randrange(2, 24)
    init = make_mlp(torch.bfloat16)
    trajectory = []  # the same parameter values for both runs
    walker = make_mlp(torch.bfloat16)
    walker.load_state_dict(init.state_dict())
    for n in range(1, steps + 1):
        random_walk(walker)
        state = {k: v.clone() for k, v in walker.state_dict().items()}
        if n == nan_step:
            state["2.weight"][0, 0] = float("nan")
        trajectory.append(state)

    def run(model: nn.Module, averager: WeightAverager, steps_range) -> None:
        for n in steps_range:
            model.load_state_dict(trajectory[n - 1])
            averager.update()

    straight_model = make_mlp(torch.bfloat16)
    straight_model.load_state_dict(init.state_dict())
    straight = WeightAverager(straight_model, **config)
    run(straight_model, straight, range(1, steps + 1))

    first_model = make_mlp(torch.bfloat16)
    first_model.load_state_dict(init.state_dict())
    first = WeightAverager(first_model, **config)
    run(first_model, first, range(1, steps // 2 + 1))
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    del first
    blob.seek(0)
    resumed_model = make_mlp(torch.bfloat16)  # fresh weights: the average must come from the checkpoint
    resumed_model.load_state_dict(trajectory[steps // 2 - 1])
    resumed = WeightAverager(resumed_model, **config)
    resumed.load_state_dict(torch.load(blob))
    run(resumed_model, resumed, range(steps // 2 + 1, steps + 1))

    assert (resumed.step, resumed.n_averaged, resumed.skipped) == (straight.step, straight.n_averaged, straight.skipped)
    for name, view in straight.average_state_dict().items():
        assert torch.equal(bits(resumed.average_state_dict()[name]), bits(view)), name


def test_load_state_dict_rejects_mismatch_and_changes_nothing():
    model = make_mlp()
    avg = WeightAverager(model, mode="swa")
    for _ in range(3):
        random_walk(model)
        avg.update()
    good = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in avg.state_dict().items()}
    good["average"] = {k: v.clone() + 1 for k, v in good["average"].items()}
    before = {k: v.clone() for k, v in avg.average_state_dict().items()}
    counters = (avg.step, avg.n_averaged, avg.skipped)

    def variant(**changes):
        state = dict(good)
        state["average"] = dict(good["average"])
        for key, value in changes.items():
            if key == "average":
                value(state["average"])
            else:
                state[key] = value
        return state

    bad = {
        "renamed": (variant(average=lambda a: a.update({"9.weight": a.pop("3.weight")})), "missing"),
        "extra": (variant(average=lambda a: a.update({"extra": torch.zeros(1)})), "unexpected"),
        "shape": (variant(average=lambda a: a.update({"0.bias": torch.zeros(33)})), "'0.bias' has shape"),
        "mode": (variant(mode="ema"), "mode"),
        "step": (variant(step=-1), "step"),
    }
    for label, (state, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            avg.load_state_dict(state)
        for name, view in avg.average_state_dict().items():
            assert torch.equal(bits(view), bits(before[name])), f"{label}: {name} changed"
        assert (avg.step, avg.n_averaged, avg.skipped) == counters, label
    with pytest.raises(ValueError, match="missing keys"):
        avg.load_state_dict({"mode": "swa"})
    avg.load_state_dict(good)  # and the unmodified one loads
    for name, view in avg.average_state_dict().items():
        assert torch.equal(view, good["average"][name]), name


# ------------------------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("mode", ["ema", "swa"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_step_is_skipped(mode, poison):
    steps = 12
    # EMA's first applied update is a copy, so only a later step can be left out without changing its role.
    bad_step = random.randrange(1 if mode == "swa" else 2, steps + 1)
    trajectory = []
    walker = make_mlp(torch.bfloat16)
    for _ in range(steps):
        random_walk(walker)
        trajectory.append({k: v.clone() for k, v in walker.state_dict().items()})

    def run(skip_bad: bool, poison_bad: bool) -> WeightAverager:
        model = make_mlp(torch.bfloat16)
        model.load_state_dict(trajectory[0])
        averager = WeightAverager(model, mode=mode, decay=0.85)
        for n in range(1, steps + 1):
            if n == bad_step and skip_bad:
                continue
            state = trajectory[n - 1]
            if n == bad_step and poison_bad:
                state = {k: v.clone() for k, v in state.items()}
                state["0.bias"][random.randrange(32)] = poison
            model.load_state_dict(state)
            averager.update()
        return averager

    poisoned, clean = run(skip_bad=False, poison_bad=True), run(skip_bad=True, poison_bad=False)
    assert poisoned.skipped == 1 and clean.skipped == 0
    assert poisoned.n_averaged == clean.n_averaged == steps - 1
    for name, view in clean.average_state_dict().items():
        assert torch.equal(bits(poisoned.average_state_dict()[name]), bits(view)), name


def test_skipped_counter_stays_on_device_and_nonfinite_can_be_kept():
    model = make_mlp()
    avg = WeightAverager(model, mode="swa", skip_nonfinite=False)
    avg.update()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    avg.update()
    assert torch.isnan(avg.average_state_dict()["0.weight"][0, 0])
    assert avg.skipped == 0 and avg.n_averaged == 2
    assert isinstance(WeightAverager(model).engine.skipped, Tensor)


# ------------------------------------------------------------------------------ buffers
def test_include_buffers_averages_float_buffers_and_keeps_latest_integer_ones():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8))
    avg = WeightAverager(model, mode="swa", include_buffers=True)
    assert avg.names == [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    snaps = []
    for _ in range(4):
        model(torch.randn(16, 5))  # training-mode forward moves the running stats
        random_walk(model)
        snaps.append({n: t.detach().double().clone() for n, t in model.state_dict().items()})
        avg.update()
    got = avg.average_state_dict()
    for name in ("1.running_mean", "1.running_var", "0.weight"):
        expected = sum(s[name] for s in snaps) / len(snaps)
        assert_close(got[name], expected, what=name, **FP32_TOL)
    assert got["1.num_batches_tracked"].dtype == torch.int64
    assert int(got["1.num_batches_tracked"]) == int(model[1].num_batches_tracked) == 4
    assert "1.running_mean" not in WeightAverager(model).average_state_dict()

    training = {n: t.clone() for n, t in model.state_dict().items()}
    with avg.swapped():
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, got[name].to(tensor.dtype)), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(bits(tensor), bits(training[name])), name


def test_mapping_input_and_average_state_dict_views():
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.bfloat16)}
    avg = WeightAverager(tensors, mode="ema", decay=0.5)
    first = {k: v.double().clone() for k, v in tensors.items()}
    avg.update()
    for t in tensors.values():
        t.add_(torch.randn_like(t))
    avg.update()
    for name, view in avg.average_state_dict().items():
        assert_close(view, 0.5 * first[name] + 0.5 * tensors[name].double(), what=name, **FP32_TOL)
    view = avg.average_state_dict()["w"]
    assert view.data_ptr() == avg.average_state_dict()["w"].data_ptr()  # a live view, not a copy


# ------------------------------------------------------------------------------- memory
def _cpu_allocation_peak(fn) -> int:
    """Peak bytes allocated on CPU (net of frees) while fn runs, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    current = peak = 0
    for event in events:
        current += event.extra_fields.alloc_size
        peak = max(peak, current)
    return peak


def test_bf16_model_fp32_average_costs_four_bytes_per_param():
    model = nn.Sequential(nn.Linear(300, 301), nn.Linear(301, 17)).to(torch.bfloat16)
    avg = WeightAverager(model, mode="ema")
    numel = sum(p.numel() for p in model.parameters())
    padding = 4 * 16 * len(list(model.parameters()))  # each view starts on a 16-element boundary
    assert 4 * numel <= avg.nbytes <= 4 * numel + padding


@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_averager_itself_allocates_no_parameter_sized_temporaries(mode, monkeypatch):
    """With a backend that works in place, the whole update allocates only a few bytes (counters, flags)."""
    import types

    in_place = types.SimpleNamespace(
        lerp_=lambda avgs, srcs, w, w_tensor, found_inf: torch._foreach_lerp_(
            list(avgs), list(srcs), w if w_tensor is None else w_tensor.float()),
        any_nonfinite=lambda tensors: torch.zeros(()))
    monkeypatch.setattr(swm_fused.dispatch, "select", lambda device: types.SimpleNamespace(name="in_place", kernels=in_place))
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(3)])
    avg = WeightAverager(model, mode=mode, decay=0.9)
    avg.update()
    random_walk(model)
    assert _cpu_allocation_peak(avg.update) < 4 * 128 * 128 // 64
    views = list(avg.average_state_dict().values())
    assert _cpu_allocation_peak(lambda: torch._foreach_lerp_(views, [p * 1 for p in model.parameters()], 0.1)) \
        >= 4 * 128 * 128  # the measurement sees a parameter-sized temporary when there is one


@pytest.mark.skipif("cpp" not in swm_fused.available_backends(),
                    reason="needs the fused cpp backend (the reference backend allocates temporaries by design)")
@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_update_allocates_no_parameter_sized_temporaries(mode):
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).to(torch.bfloat16)
    avg = WeightAverager(model, mode=mode, decay=0.99)
    avg.update()  # first (copying) update out of the way
    random_walk(model)
    smallest_param_bytes = 2 * min(p.numel() for p in model.parameters() if p.dim() == 2)
    with swm_fused.use_backend("cpp"):
        peak = _cpu_allocation_peak(avg.update)
    assert peak < smallest_param_bytes // 8, f"update allocated {peak} bytes"

    # The measurement must see a temporary when there is one: the usual torch way casts every param.
    views = list(avg.average_state_dict().values())
    wasteful = _cpu_allocation_peak(lambda: torch._foreach_lerp_(views, [p.float() for p in model.parameters()], 0.01))
    assert wasteful >= 4 * 256 * 256


# ------------------------------------------------------------------------------ offload
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to offload from")
@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_cpu_offload_of_a_gpu_model(mode):
    model = make_mlp(torch.bfloat16).cuda()
    avg = WeightAverager(model, mode=mode, decay=0.9, device="cpu")
    assert all(v.device.type == "cpu" for v in avg.average_state_dict().values())
    assert all(s.is_pinned() for buf in avg.engine.staging_buffers() for s in buf.storages)
    snaps = []
    for _ in range(8):
        random_walk(model)
        snaps.append({k: v.cpu() for k, v in snapshot(model).items()})
        avg.update()
    expected = oracle_run(snaps, mode, decay=0.9)
    for name, view in avg.average_state_dict().items():
        assert_close(view, expected[name], what=name, **FP32_TOL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with avg.swapped():
        for name, p in model.named_parameters():
            assert torch.equal(p.cpu(), avg.average_state_dict()[name].to(torch.bfloat16)), name
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
