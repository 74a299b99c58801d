"""AveragingEngine: pairing is done once and never goes stale (issue 10, section 2).

Every way a model's tensors can change under an averager is tried on WeightAverager and on
swa_utils.AveragedModel: a parameter replaced, load_state_dict(assign=True), model.to(...) (set_data
and overwrite modes, and a device move), FSDP2 sharding after the averager was built. Each either
re-pairs (the average continues with the new tensors, checked against a float64 oracle) or raises
StaleModelError naming the change; an update never walks the model when nothing changed.
"""
from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

import swm_fused
from swm_fused.engine import AveragingEngine, StaleModelError
from swm_fused.swa_utils import AveragedModel
from swm_fused.averager import WeightAverager

from _helpers import assert_close

TOL = dict(atol=1e-6, rtol=1e-6)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@torch.no_grad()
def set_weights(model: nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen))
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def mean_of(snapshots):
    return {k: sum(s[k] for s in snapshots) / len(snapshots) for k in snapshots[0]}


class WalkCounter:
    def __init__(self, monkeypatch):
        self.n = 0
        original = nn.Module.named_parameters

        def counting(module, *args, **kwargs):
            self.n += 1
            return original(module, *args, **kwargs)
        monkeypatch.setattr(nn.Module, "named_parameters", counting)


def test_update_does_not_walk_the_model(monkeypatch):
    model = make_model()
    averager = WeightAverager(model, mode="swa")
    averaged = AveragedModel(model, multi_avg_fn=swm_fused.swa_utils.get_ema_multi_avg_fn(0.9))
    averager.update()
    averaged.update_parameters(model)
    walks = WalkCounter(monkeypatch)
    for _ in range(5):
        averager.update()
        averaged.update_parameters(model)
    assert walks.n == 0


def _replace_parameter(model):
    model[2].weight = nn.Parameter(torch.zeros(3, 5))


def _assign_load(model):
    fresh = make_model()
    model.load_state_dict(fresh.state_dict(), assign=True)


def _overwrite_to(model):
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64).to(torch.float32)  # new Parameter objects, written into _parameters directly
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


def _set_data_to(model):
    model.to(torch.float64)  # the same Parameter objects, new storage (set_data)


CHANGES = {"replaced": _replace_parameter, "assign": _assign_load, "overwrite_to": _overwrite_to,
           "set_data_to": _set_data_to}


@pytest.mark.parametrize("change", list(CHANGES))
def test_weight_averager_follows_a_changed_model(change):
    model = make_model()
    averager = WeightAverager(model, mode="swa")
    snaps = []
    for step in range(3):
        snaps.append(set_weights(model, step))
        averager.update()
    old = list(model.parameters())
    CHANGES[change](model)
    if change != "set_data_to":
        assert any(a is not b for a, b in zip(old, model.parameters()))
    for step in range(3, 6):
        snaps.append(set_weights(model, step))  # writes the model's *current* tensors
        averager.update()
    expected = mean_of(snaps)
    for name, view in averager.average_state_dict().items():
        assert_close(view, expected[name], what=f"{change} {name}", **TOL)
    with averager.swapped():  # and swapping writes the current tensors
        for name, p in model.named_parameters():
            assert torch.equal(p.float(), averager.average_state_dict()[name]), name


@pytest.mark.parametrize("change", list(CHANGES))
def test_averaged_model_follows_a_changed_model(change):
    model = make_model()
    averaged = AveragedModel(model, multi_avg_fn=swm_fused.swa_utils.get_swa_multi_avg_fn())
    snaps = []
    for step in range(3):
        snaps.append(set_weights(model, step))
        averaged.update_parameters(model)
    CHANGES[change](model)
    for step in range(3, 6):
        snaps.append(set_weights(model, step))
        averaged.update_parameters(model)
    expected = mean_of(snaps)
    for name, p in averaged.module.named_parameters():
        assert_close(p, expected[name], what=f"{change} {name}", **TOL)


def test_averaged_model_follows_its_own_module_being_reloaded_with_assign():
    model = make_model()
    averaged = AveragedModel(model, multi_avg_fn=swm_fused.swa_utils.get_swa_multi_avg_fn())
    snaps = [set_weights(model, 0)]
    averaged.update_parameters(model)
    snaps.append(set_weights(model, 1))
    averaged.update_parameters(model)
    state = {k: v.clone() for k, v in averaged.state_dict().items()}
    averaged.load_state_dict(state, assign=True)  # the average's own parameters are new objects now
    snaps.append(set_weights(model, 2))
    averaged.update_parameters(model)
    expected = mean_of(snaps)
    for name, p in averaged.module.named_parameters():
        assert_close(p, expected[name], what=name, **TOL)


def test_a_reshaped_or_renamed_parameter_raises():
    model = make_model()
    averager = WeightAverager(model)
    averager.update()
    model[2].weight = nn.Parameter(torch.zeros(4, 5))
    with pytest.raises(StaleModelError, match="'2.weight' changed shape"):
        averager.update()
    assert isinstance(StaleModelError("x"), ValueError)
    model = make_model()
    averager = WeightAverager(model)
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(StaleModelError, match="new \\['extra'\\]"):
        averager.update()

    averaged = AveragedModel(model)
    averaged.update_parameters(model)
    model[0].bias = nn.Parameter(torch.zeros(7))
    with pytest.raises(ValueError, match="'0.bias'"):
        averaged.update_parameters(model)


def test_a_device_move_raises():
    model = make_model()
    averager = WeightAverager(model)
    averager.update()
    model.to("meta")
    with pytest.raises(StaleModelError, match="meta"):
        averager.update()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fully_shard_after_the_averager_was_built_re_pairs_to_the_shards():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = make_model()
        averager = WeightAverager(model, mode="swa")
        snaps = [set_weights(model, 0)]
        averager.update()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert all(hasattr(p, "to_local") for p in model.parameters())
        for step in (1, 2):
            gen = torch.Generator().manual_seed(step)
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().copy_(torch.randn(p.shape, generator=gen))
            snaps.append({n: p.to_local().double().clone() for n, p in model.named_parameters()})
            averager.update()
        expected = mean_of(snaps)
        for name, view in averager.average_state_dict().items():
            assert hasattr(view, "to_local"), name  # laid out like the (now sharded) parameter
            assert_close(view.to_local(), expected[name], what=name, **TOL)
    finally:
        dist.destroy_process_group()


def test_engine_segments_share_one_fused_call_and_keep_their_own_counts():
    a, b = torch.randn(5), torch.randn(3)
    engine = AveragingEngine([("a", a), ("b", b)], segments=[0, 1])
    engine.update("swa")
    engine.update("swa", segments=[1])
    assert engine.count(0).item() == 1 and engine.count(1).item() == 2
    assert engine.attempts == [1, 2]
    with pytest.raises(ValueError, match="mode"):
        engine.update("mean")


def test_exception_type_rule():
    """A wrong type is a TypeError; the right type with a wrong value (empty, out of range, mismatched) a
    ValueError; a call in the wrong state a RuntimeError."""
    from swm_fused import SWAG
    from swm_fused.averager import EMAWarmup
    from swm_fused.optim import EMA

    with pytest.raises(TypeError):
        EMAWarmup(update_after_step=1.5)
    with pytest.raises(ValueError):
        EMAWarmup(update_after_step=-1)
    with pytest.raises(TypeError):
        WeightAverager(make_model(), decay="0.9")
    with pytest.raises(ValueError):
        WeightAverager(make_model(), decay=2.0)
    with pytest.raises(ValueError):
        WeightAverager({})  # empty
    with pytest.raises(ValueError):
        AveragingEngine([])
    swag = SWAG(make_model())
    swag.collect()
    with pytest.raises(ValueError):
        swag.sample(scale=float("nan"))
    with pytest.raises(TypeError):
        swag.sample(scale="1")
    ema = EMA(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(TypeError):
        ema.decay = None
    averager = WeightAverager(make_model())
    with averager.swapped():
        with pytest.raises(RuntimeError):
            averager.update()


def test_per_tensor_average_dtypes():
    """dtype may give one entry per tensor (names order): each average keeps its own dtype, in one update."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    model[2].to(torch.bfloat16)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    dtypes = [torch.float64 if n.startswith("1.") else None for n in names]  # None: the default rule
    engine = AveragingEngine(model, dtype=dtypes, include_buffers=True, skip_nonfinite=False)
    got = {n: v.dtype for n, v in engine.average_state_dict().items()}
    assert got["1.weight"] == got["1.running_mean"] == torch.float64
    assert got["0.weight"] == got["2.weight"] == torch.float32
    assert got["1.num_batches_tracked"] == torch.int64  # integer tensors keep their latest value
    kept = tuple(t.dtype if t.is_floating_point() else None for t in engine.model_tensors())
    same = AveragingEngine(model, dtype=kept, include_buffers=True)
    assert [v.dtype for v in same.views()] == [t.dtype for t in engine.model_tensors()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    same.update("ema", decay=0.5)
    for view, tensor in zip(same.views(), engine.model_tensors()):
        if tensor.is_floating_point() and view.dim() and tensor.requires_grad:
            assert_close(view, tensor.detach() - 0.5, atol=1e-2, rtol=0, what="mixed-dtype update")
    with pytest.raises(ValueError, match="dtypes for"):
        AveragingEngine(model, dtype=[torch.float32])
    with pytest.raises(TypeError, match="each dtype"):
        AveragingEngine(model, dtype=[torch.int32] * len(names), include_buffers=True)


# ----------------------------------------------------------------------------- the bound hot path
def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _trajectory(model: nn.Module, steps: int, nan_steps=()):
    """Per step: load fresh weights (NaN at nan_steps) and run a training-mode forward (moves BN buffers)."""
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            if step in nan_steps:  # in the last layer: the BN buffers stay finite
                model[2].weight.view(-1)[0] = float("nan")
        model(torch.randn(8, 4, generator=gen))
        yield step


def _run_averager(mode: str, flat: bool, include_buffers: bool, bound: bool, monkeypatch) -> dict:
    with monkeypatch.context() as patch:
        if not bound:  # the engine's previous path: BoundLists.step_ through torchbind, then Python counters
            patch.setattr(swm_fused.BoundLists, "bind_step", lambda self, *args, **kwargs: None)
        model = _bn_model()
        if flat:
            swm_fused.flatten_parameters(model)
        warmup = dict(warmup_gamma=0.5, warmup_power=0.9) if mode == "ema" else None
        averager = WeightAverager(model, mode=mode, decay=0.8, warmup=warmup, include_buffers=include_buffers)
        for _ in _trajectory(model, 9, nan_steps={3, 8}):  # the last step skipped: buffers keep step 8
            averager.update()
        assert (averager.engine._fast is not None) == bound
        state = averager.state_dict()
        return {"average": {k: v.clone() for k, v in state["average"].items()}, "n_averaged": int(state["n_averaged"]),
                "skipped": int(state["skipped"]), "n_updates": state["n_updates"]}


@pytest.mark.skipif("cpp" not in swm_fused.available_backends(), reason="needs the compiled cpp backend")
@pytest.mark.parametrize("mode", ["ema", "swa"])
@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
@pytest.mark.parametrize("include_buffers", [False, True], ids=["params", "buffers"])
def test_bound_step_equals_the_op_path_bit_for_bit(mode, flat, include_buffers, monkeypatch):
    """The update bound in C++ (swm_fused._C.bound_step) gives what BoundLists.step_ plus the engine's Python
    counters gave, bit for bit: averages, integer buffers kept as their latest value (not on a skipped step),
    device counters, the skipped count."""
    got = _run_averager(mode, flat, include_buffers, True, monkeypatch)
    want = _run_averager(mode, flat, include_buffers, False, monkeypatch)
    assert (got["n_averaged"], got["skipped"], got["n_updates"]) == (want["n_averaged"], want["skipped"],
                                                                    want["n_updates"]) == (7, 2, 9)
    assert list(got["average"]) == list(want["average"])
    for name, tensor in got["average"].items():
        want_bytes = want["average"][name].reshape(-1).view(torch.uint8)
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), want_bytes), name
    if include_buffers:
        assert int(got["average"]["1.num_batches_tracked"]) == 8  # not 9: the last step was skipped


def _bound_calls(monkeypatch) -> list:
    from swm_fused import _C
    calls = []
    real = _C.bound_step

    def spy(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(_C, "bound_step", spy)
    return calls


def test_a_flat_model_whose_storage_changes_falls_back_to_lists_and_stays_correct(monkeypatch):
    calls = _bound_calls(monkeypatch)
    model = make_model()
    swm_fused.flatten_parameters(model)
    averager = WeightAverager(model, mode="swa")
    snaps = [set_weights(model, 0)]
    averager.update()
    assert [len(x) for x in averager.engine._fast.bound._lists] == [1, 1]  # one storage
    view = model[0].weight.detach()  # one more reference to the flat storage: no longer provably intact
    snaps.append(set_weights(model, 1))
    averager.update()
    assert [len(x) for x in averager.engine._fast.bound._lists] == [4, 4]  # per-tensor lists
    del view
    model[2].bias.data = torch.zeros(3)  # the parameter leaves the flat storage (same Parameter object)
    snaps.append(set_weights(model, 2))
    averager.update()
    snaps.append(set_weights(model, 3))
    averager.update()
    assert len(calls) == 5  # one refused (stale storage, nothing done), then every update one call
    expected = mean_of(snaps)
    for name, view in averager.average_state_dict().items():
        assert_close(view, expected[name], what=name, **TOL)


def test_a_forced_backend_after_binding_is_obeyed(monkeypatch):
    from swm_fused.backends import reference
    calls = _bound_calls(monkeypatch)
    ref_calls = []
    real_lerp = reference.lerp_
    monkeypatch.setattr(reference, "lerp_", lambda *args: (ref_calls.append(1), real_lerp(*args))[1])
    model = make_model()
    averager = WeightAverager(model, mode="swa")
    snaps = [set_weights(model, 0)]
    averager.update()
    assert len(calls) == 1
    with swm_fused.use_backend("reference"):
        snaps.append(set_weights(model, 1))
        averager.update()
    assert len(calls) == 1 and len(ref_calls) == 1
    monkeypatch.setenv("SWM_FUSED_BACKEND", "reference")
    snaps.append(set_weights(model, 2))
    averager.update()
    assert len(calls) == 1 and len(ref_calls) == 2
    monkeypatch.delenv("SWM_FUSED_BACKEND")
    snaps.append(set_weights(model, 3))
    averager.update()
    assert len(calls) == 2 and len(ref_calls) == 2
    assert averager.n_averaged == 4
    expected = mean_of(snaps)
    for name, view in averager.average_state_dict().items():
        assert_close(view, expected[name], what=name, **TOL)


def test_bound_step_reads_skip_nonfinite_and_decay_each_call():
    model = make_model()
    averager = WeightAverager(model, mode="ema", decay=0.5)
    set_weights(model, 0)
    averager.update()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    averager.update()
    assert averager.skipped == 1 and averager.n_averaged == 1
    averager.skip_nonfinite = False
    averager.update()
    assert averager.skipped == 1 and averager.n_averaged == 2
    assert torch.isnan(averager.average_state_dict()["0.weight"][0, 0])
    before = {n: v.double().clone() for n, v in averager.average_state_dict().items()}
    current = set_weights(model, 1)
    averager.decay = 0.25
    averager.update()
    for name, view in averager.average_state_dict().items():
        assert_close(view, 0.25 * before[name] + 0.75 * current[name], what=name, **TOL)
    engine = averager.engine
    with pytest.raises(ValueError, match="step_: decay must be in \\[0, 1\\]"):
        engine.update("ema", decay=1.5)
    with pytest.raises(ValueError, match="step_: decay must be finite"):
        engine.update("ema", decay=float("nan"))
    engine.update("ema", decay=1)  # an int takes the full path: same result (decay 1 keeps the average)
    assert averager.n_averaged == 4


def test_a_parameter_whose_data_changes_shape_raises_from_the_bound_step():
    model = make_model()
    averager = WeightAverager(model)
    averager.update()
    model[2].bias.data = torch.zeros(4)  # same Parameter object: no re-pairing, the validator sees it
    with pytest.raises(ValueError, match="step_: shape mismatch at index 3"):
        averager.update()


def test_segments_updated_apart_then_together_keep_their_counts():
    a, b = torch.randn(5), torch.randn(3)
    engine = AveragingEngine([("a", a), ("b", b)], segments=[0, 1])
    engine.update("swa")
    assert engine._fast is not None
    engine.update("swa", segments=[1])
    assert engine._fast is None  # histories diverged
    engine.update("swa")  # tokens differ: the segment path, one call per cohort
    assert engine.count(0).item() == 2 and engine.count(1).item() == 3 and engine.attempts == [2, 3]


def test_warmup_schedule_is_cached_only_once_final():
    from swm_fused.averager import EMAWarmup
    model = make_model()
    warmup = EMAWarmup(warmup_gamma=1.0, warmup_power=0.9, min_decay=0.05)
    averager = WeightAverager(model, mode="ema", decay=0.9, warmup=warmup)
    seen = []
    for step in range(1, 60):
        seen.append(averager._decay(step))
        assert seen[-1] == warmup.decay_at(step, 0.9), step
    assert averager._warm_done is not None and averager._warm_done[0] < 60
    assert averager._decay(3) == warmup.decay_at(3, 0.9) < 0.9  # an earlier step is computed again
    averager.decay = 0.95  # a new target: computed again until the curve passes it
    assert averager._decay(59) == warmup.decay_at(59, 0.95)


@pytest.mark.skipif("cpp" not in swm_fused.available_backends(), reason="needs the compiled cpp backend")
def test_bound_step_raises_what_the_validator_raises_first():
    """The CPU bound step validates and stages in one pass; a broken list raises exactly the error of lerp_'s
    validator (its first, in its list-by-list order), and nothing is written."""
    from swm_fused import _C

    def lists():
        return [torch.zeros(3), torch.zeros(2, 2), torch.zeros(4)], [torch.ones(3), torch.ones(2, 2), torch.ones(4)]
    breaks = {
        "src dtype": lambda a, s: s.__setitem__(1, torch.ones(2, 2, dtype=torch.int64)),
        "src shape": lambda a, s: s.__setitem__(2, torch.ones(5)),
        "src device": lambda a, s: s.__setitem__(1, torch.ones(2, 2, device="meta")),
        "avg dtype": lambda a, s: a.__setitem__(1, torch.zeros(2, 2, dtype=torch.int32)),
        "avg later, src earlier": lambda a, s: (a.__setitem__(2, torch.zeros(4, dtype=torch.int64)),
                                                s.__setitem__(1, torch.ones(7))),
    }
    for what, brk in breaks.items():
        avg, src = lists()
        brk(avg, src)
        with pytest.raises((ValueError, TypeError)) as plain:
            swm_fused.ema_(avg, src, 0.5)
        counts = torch.zeros(1, dtype=torch.int64)
        bound = swm_fused.BoundLists(avg, src)
        key = bound.bind_step(counts)
        with pytest.raises(plain.type) as got:
            _C.bound_step(key, 0.5, True)
        assert f"ema_: {got.value}" == str(plain.value), what
        assert counts.item() == 0 and all(not a.is_floating_point() or a.abs().sum() == 0 for a in avg), what


def test_under_a_dispatch_mode_the_update_goes_through_the_dispatcher(monkeypatch):
    """The bound CPU step calls its kernels directly; a TorchDispatchMode must still see the update's ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = _bound_calls(monkeypatch)

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = make_model()
    averager = WeightAverager(model, mode="swa")
    snaps = [set_weights(model, 0)]
    averager.update()
    assert len(calls) == 1
    snaps.append(set_weights(model, 1))
    with Recorder() as recorder:
        averager.update()
    assert len(calls) == 1 and any("swm_fused.lerp_" in op for op in recorder.ops), recorder.ops
    snaps.append(set_weights(model, 2))
    averager.update()
    assert len(calls) == 2
    expected = mean_of(snaps)
    for name, view in averager.average_state_dict().items():
        assert_close(view, expected[name], what=name, **TOL)
