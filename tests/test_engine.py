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
