"""swm_fused.sam.SAM against a plain port of davda54/sam, the exact restore, GradScaler, the BatchNorm
bypass, interval, SWA + SAM, schedulers and state dicts, no host sync, bad input, and DDP on 2 gloo ranks."""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import swm_fused
from swm_fused import use_backend
from swm_fused.sam import SAM, sam_bn_bypass, sam_no_sync
from _helpers import bits, cpu_backends
from _multiprocess import run_ranks
from test_no_sync import HostSync, no_host_sync  # noqa: F401  (the fixture)

BACKENDS = cpu_backends()


class DavdaSAM(torch.optim.Optimizer):
    """davda54/sam (MIT licence), sam.py, ported as it is: the per-parameter loop the fused SAM replaces."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        assert rho >= 0.0, f"Invalid rho, should be non-negative: {rho}"
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # get back to "w" from "w + e(w)"
        self.base_optimizer.step()  # do the actual "sharpness-aware" update
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
            for group in self.param_groups for p in group["params"] if p.grad is not None]), p=2)


def make_model(seed: int = 0, dtype=torch.float32, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 33), nn.Tanh()] + ([nn.BatchNorm1d(33)] if bn else []) + [nn.Linear(33, 4)]
    return nn.Sequential(*layers).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float32) -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 10, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def train(model, optimizer, data, steps_api: bool = True) -> None:
    for batch in data:
        loss_fn(model, batch).backward()
        if steps_api:
            optimizer.first_step(zero_grad=True)
            loss_fn(model, batch).backward()
            optimizer.second_step(zero_grad=True)
        else:
            optimizer.step(lambda: loss_fn(model, batch).backward())
            optimizer.zero_grad()


def assert_params_close(a: nn.Module, b: nn.Module, atol: float, rtol: float, what: str = "") -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = (p.double() - q.double()).abs().max().item()
        assert torch.allclose(p.double(), q.double(), atol=atol, rtol=rtol), f"{what} {name}: max abs diff {err:.3g}"


BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))}


# ---------------------------------------------------------------------------------------------
# Equivalence with davda54/sam.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_davda54_sam(backend, adaptive, base, dtype):
    """Same model, data and base optimizer for 8 steps: the weights agree to float rounding (the norms
    are summed in another order; the ascent is the same products and sum, rounded the same way)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the interpreted Triton kernels are slow; float64 runs on the other backends")
    base_cls, kwargs = BASES[base]
    rho = 0.5 if adaptive else 0.05
    ours, theirs = make_model(dtype=dtype), make_model(dtype=dtype)
    data = batches(8, dtype=dtype)
    with use_backend(backend):
        train(ours, SAM(ours.parameters(), base_cls, rho=rho, adaptive=adaptive, **kwargs), data)
    train(theirs, DavdaSAM(theirs.parameters(), base_cls, rho=rho, adaptive=adaptive, **kwargs), data)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_params_close(ours, theirs, tol, tol, f"{backend} {base}")
    assert not torch.equal(ours[0].weight, make_model(dtype=dtype)[0].weight)


def test_step_with_closure_equals_the_two_steps():
    a, b = make_model(), make_model()
    data = batches(5)
    train(a, SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), data, steps_api=True)
    train(b, SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), data, steps_api=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(bits(p), bits(q))


def test_param_groups_with_their_own_rho_and_adaptive():
    """Groups may set rho and adaptive; davda54/sam's norm takes |w| from group 0 for every group, this
    one from each parameter's own group: with every group adaptive (or none) the two agree."""
    data = batches(4)
    models = [make_model(), make_model()]
    opts = []
    for m, cls in zip(models, (SAM, DavdaSAM)):
        groups = [{"params": m[0].parameters(), "rho": 0.5}, {"params": m[2].parameters(), "rho": 1.5}]
        opts.append(cls(groups, torch.optim.SGD, adaptive=True, lr=0.05))
    for m, o in zip(models, opts):
        train(m, o, data)
    assert_params_close(models[0], models[1], 1e-5, 1e-5)


def test_bf16_autocast_needs_no_scaler():
    """The bf16 autocast recipe: autocast around both forwards, no scaler; matches davda54/sam under the same autocast."""
    data = batches(5)
    ours, theirs = make_model(), make_model()
    for model, opt in ((ours, SAM(ours.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)),
                       (theirs, DavdaSAM(theirs.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9))):
        for batch in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, batch)
            loss.backward()
            opt.first_step(zero_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, batch)
            loss.backward()
            opt.second_step(zero_grad=True)
    assert_params_close(ours, theirs, 1e-5, 1e-5, "bf16 autocast")


# ---------------------------------------------------------------------------------------------
# The restore.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_is_bit_identical_with_a_zero_learning_rate(backend, adaptive, dtype):
    model = make_model(dtype=dtype)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive=adaptive, lr=0.0)
    batch = batches(1, dtype=dtype)[0]
    with use_backend(backend):
        loss_fn(model, batch).backward()
        assert optimizer.first_step(zero_grad=True) and optimizer.is_perturbed
        assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start)), "the ascent moved nothing"
        loss_fn(model, batch).backward()
        optimizer.second_step(zero_grad=True)
    assert not optimizer.is_perturbed
    for p, s in zip(model.parameters(), start):
        assert torch.equal(bits(p), bits(s))


def test_parameters_without_gradients_are_left_alone():
    model = make_model()
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    train(model, optimizer, batches(2))
    assert torch.equal(model[2].weight, frozen)


# ---------------------------------------------------------------------------------------------
# GradScaler.

def _scaled_step(model, optimizer, scaler, batch, inject: str, use_closure: bool) -> None:
    def backward(pass_name: str) -> None:
        scaler.scale(loss_fn(model, batch)).backward()
        if inject == pass_name:
            model[0].weight.grad[1, 2] = float("inf")

    backward("first")
    if use_closure:
        optimizer.step(lambda: backward("second"), scaler=scaler)
    else:
        optimizer.first_step(zero_grad=True, scaler=scaler)
        backward("second")
        optimizer.second_step(scaler=scaler)
    optimizer.zero_grad()
    scaler.update()


@pytest.mark.parametrize("use_closure", [False, True], ids=["steps", "closure"])
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_sgd"])
@pytest.mark.parametrize("inject", ["first", "second"])
def test_grad_scaler_skips_the_step_and_backs_off(inject, fused, use_closure):
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    data = batches(2)
    _scaled_step(model, optimizer, scaler, data[0], "none", use_closure)  # a normal step first
    assert scaler.get_scale() == 2.0 ** 12
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [optimizer.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _scaled_step(model, optimizer, scaler, data[1], inject, use_closure)
    assert scaler.get_scale() == 2.0 ** 11, "the scaler must back off"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(bits(p), bits(b)), f"a step with Inf in the {inject} pass changed the weights"
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.base_optimizer.state[p]["momentum_buffer"], m)
    _scaled_step(model, optimizer, scaler, data[1], "none", use_closure)  # and training goes on
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_sgd"])
def test_grad_scaler_steps_equal_unscaled_steps(fused):
    """A power-of-two scale is undone exactly: with finite gradients the weights equal those of unscaled SAM."""
    a, b = make_model(), make_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fused=fused)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for batch in batches(4):
        _scaled_step(a, opt_a, scaler, batch, "none", use_closure=False)
    train(b, opt_b, batches(4))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(bits(p), bits(q))


# ---------------------------------------------------------------------------------------------
# BatchNorm.

def test_bn_bypass_running_stats_equal_one_forward():
    model = make_model(bn=True)
    reference = copy.deepcopy(model)
    batch = batches(1)[0]
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    bn = model[2]
    momentum = bn.momentum
    loss_fn(model, batch).backward()
    optimizer.first_step(zero_grad=True)
    with sam_bn_bypass(model):
        loss_fn(model, batch).backward()
    optimizer.second_step(zero_grad=True)
    reference(batch[0])  # one forward, in training mode
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(reference.named_buffers())[name]), name
    assert bn.momentum == momentum and bn.track_running_stats


def test_without_the_bypass_the_second_forward_would_count():
    model = make_model(bn=True)
    reference = copy.deepcopy(model)
    batch = batches(1)[0]
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    train(model, optimizer, [batch])
    reference(batch[0])
    assert model[2].num_batches_tracked.item() == 2
    assert not torch.equal(model[2].running_mean, reference[2].running_mean)


def test_bn_bypass_restores_on_error_and_leaves_eval_mode_alone():
    model = make_model(bn=True)
    with pytest.raises(KeyError):
        with sam_bn_bypass(model):
            raise KeyError("boom")
    assert model[2].track_running_stats
    model.eval()
    x = batches(1)[0][0]
    expected = model(x)
    with sam_bn_bypass(model):
        assert torch.equal(model(x), expected)  # eval mode still normalises with the running statistics
    with pytest.raises(TypeError, match="sam_bn_bypass: model must be an nn.Module"):
        with sam_bn_bypass([model]):
            pass


# ---------------------------------------------------------------------------------------------
# interval, SWA + SAM, schedulers, state dicts.

def test_interval_applies_the_ascent_every_n_steps():
    ours, theirs = make_model(), make_model()
    optimizer = SAM(ours.parameters(), torch.optim.SGD, interval=3, lr=0.1, momentum=0.9)
    davda = DavdaSAM(theirs.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []
    for i, batch in enumerate(batches(7)):
        loss_fn(ours, batch).backward()
        optimizer.step(lambda: (calls.append(i), loss_fn(ours, batch).backward()))
        optimizer.zero_grad()
        loss_fn(theirs, batch).backward()
        if i % 3 == 0:
            davda.first_step(zero_grad=True)
            loss_fn(theirs, batch).backward()
            davda.second_step(zero_grad=True)
        else:  # a plain step with the first pass's gradient
            davda.base_optimizer.step()
            davda.zero_grad()
    assert calls == [0, 3, 6]
    assert_params_close(ours, theirs, 1e-5, 1e-5)


def test_swa_plus_sam_averages_the_restored_weights():
    """The averager, updated after each step, sees the restored-and-descended weights, never w + e_w."""
    from torch.optim.swa_utils import AveragedModel

    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.05, momentum=0.9)
    averager = swm_fused.WeightAverager(model, mode="swa")
    torch_swa = AveragedModel(model)
    snapshots: List[Dict[str, Tensor]] = []
    for batch in batches(6):
        loss_fn(model, batch).backward()
        optimizer.step(lambda: loss_fn(model, batch).backward())
        optimizer.zero_grad()
        averager.update()
        torch_swa.update_parameters(model)
        snapshots.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    mean = {n: sum(s[n] for s in snapshots) / len(snapshots) for n in snapshots[0]}
    for name, avg in averager.average_state_dict().items():
        assert torch.allclose(avg.double(), mean[name], atol=1e-6, rtol=1e-6), name
    for (name, _), avg in zip(model.named_parameters(), torch_swa.module.parameters()):
        assert torch.allclose(avg.double(), mean[name], atol=1e-6, rtol=1e-6), name


@pytest.mark.filterwarnings("error::UserWarning")  # no "lr_scheduler.step() before optimizer.step()"
def test_schedulers_work_on_the_wrapper_and_on_the_base_optimizer():
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    on_wrapper = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, batches(1))
    on_wrapper.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    on_base = torch.optim.lr_scheduler.StepLR(optimizer.base_optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, batches(1))
    on_base.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_state_dict_round_trip_relinks_the_param_groups():
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, interval=2)
    train(model, optimizer, batches(3), steps_api=False)
    state = copy.deepcopy(optimizer.state_dict())
    clone = make_model()
    clone.load_state_dict(model.state_dict())
    restored = SAM(clone.parameters(), torch.optim.SGD, rho=0.7, lr=0.5, momentum=0.9, interval=2)
    restored.load_state_dict(state)
    assert restored.param_groups is restored.base_optimizer.param_groups
    assert restored.param_groups[0]["rho"] == 0.1 and restored.param_groups[0]["lr"] == 0.1
    assert restored.sam_step_due == optimizer.sam_step_due
    data = batches(3, seed=5)
    train(model, optimizer, data, steps_api=False)
    train(clone, restored, data, steps_api=False)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(bits(p), bits(q))


def test_add_param_group_gets_sam_and_base_defaults():
    model = make_model()
    optimizer = SAM(model[0].parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    optimizer.add_param_group({"params": model[2].parameters(), "adaptive": True})
    group = optimizer.base_optimizer.param_groups[1]
    assert optimizer.param_groups[1] is group
    assert group["rho"] == 0.2 and group["adaptive"] is True and group["momentum"] == 0.9
    train(model, optimizer, batches(1))


# ---------------------------------------------------------------------------------------------
# No host sync.

@pytest.mark.parametrize("backend", BACKENDS)
def test_first_and_second_step_do_not_synchronise(backend, no_host_sync):  # noqa: F811
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    asam = SAM(model.parameters(), torch.optim.SGD, adaptive=True, rho=0.5, lr=0.1)
    batch = batches(1)[0]
    with use_backend(backend):
        for opt in (optimizer, asam):
            loss_fn(model, batch).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model, batch).backward()
            opt.second_step(zero_grad=True)
    with pytest.raises(HostSync):
        torch.zeros(1).item()


def test_grad_scaler_with_a_fused_base_does_not_synchronise(no_host_sync):  # noqa: F811
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    batch = batches(1)[0]
    for inject in ("none", "first"):
        scaler.scale(loss_fn(model, batch)).backward()
        if inject == "first":
            model[0].weight.grad[0, 0] = float("nan")
        optimizer.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(loss_fn(model, batch)).backward()
        optimizer.second_step(zero_grad=True, scaler=scaler)
        scaler.update()


# ---------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("make, error, message", [
    (lambda ps: SAM(ps, torch.optim.SGD, rho=-0.1, lr=0.1), ValueError, "SAM: rho must be a finite number >= 0, got -0.1"),
    (lambda ps: SAM(ps, torch.optim.SGD, rho=float("nan"), lr=0.1), ValueError, "SAM: rho must be a finite number"),
    (lambda ps: SAM(ps, torch.optim.SGD, rho="0.1", lr=0.1), TypeError, "SAM: rho must be a number, got str"),
    (lambda ps: SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1), TypeError,
     "SAM: base_optimizer must be an optimizer class such as torch.optim.SGD, not an instance (got a SGD object)"),
    (lambda ps: SAM(ps, "SGD", lr=0.1), TypeError, "SAM: base_optimizer must be a torch.optim.Optimizer subclass"),
    (lambda ps: SAM(ps, torch.optim.SGD, adaptive=1, lr=0.1), TypeError, "SAM: adaptive must be a bool, got int"),
    (lambda ps: SAM(ps, torch.optim.SGD, interval=0, lr=0.1), ValueError, "SAM: interval must be an int >= 1, got 0"),
    (lambda ps: SAM([{"params": ps, "rho": -1.0}], torch.optim.SGD, lr=0.1), ValueError,
     "SAM: a param group's rho must be a finite number >= 0, got -1.0"),
])
def test_bad_arguments_get_a_clear_error(make, error, message):
    params = list(make_model().parameters())
    with pytest.raises(error) as raised:
        make(params)
    assert str(raised.value).startswith(message)


def test_step_without_a_closure_and_first_step_twice_are_refused():
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    batch = batches(1)[0]
    loss_fn(model, batch).backward()
    with pytest.raises(TypeError, match="SAM.step: a closure is required"):
        optimizer.step()
    with pytest.raises(TypeError, match="SAM.step: closure must be callable"):
        optimizer.step(3)
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="already perturbed"):
        optimizer.first_step()
    with pytest.raises(RuntimeError, match="the weights are perturbed"):
        optimizer.load_state_dict(optimizer.state_dict())
    optimizer.second_step()


# ---------------------------------------------------------------------------------------------
# DDP: the ascent uses each rank's own gradient, the descent the all-reduced one.

RHO, LR = 0.3, 0.1


def _rank_batch(rank: int) -> Tuple[Tensor, Tensor]:
    return batches(1, seed=100 + rank)[0]


def _grads(model: nn.Module) -> List[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _ddp_worker(rank: int, world: int) -> Dict[str, List[Tensor]]:
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    batch = _rank_batch(rank)
    start = [p.detach().clone() for p in model.parameters()]
    with sam_no_sync(model):
        loss_fn(model, batch).backward()
    first = _grads(model)
    optimizer.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, batch).backward()
    second = _grads(model)
    optimizer.second_step(zero_grad=True)
    return {"start": start, "first": first, "perturbed": perturbed, "second": second,
            "final": [p.detach().clone() for p in model.parameters()]}


def _local_grads(params: List[Tensor], batch) -> List[Tensor]:
    model = make_model()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    loss_fn(model, batch).backward()
    return _grads(model)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ascent_uses_per_rank_gradients_and_descent_synced_ones(tmp_path):
    results = run_ranks(_ddp_worker, 2, tmp_path)
    for r in results:
        assert "ok" in r, r.get("traceback")
    out = [r["ok"] for r in results]
    expected_second = []
    for rank, o in enumerate(out):
        local = _local_grads(o["start"], _rank_batch(rank))
        for g, e in zip(o["first"], local):  # the ascent saw this rank's own gradient
            assert torch.allclose(g, e, atol=1e-6, rtol=1e-5)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in local))
        for p, s, g in zip(o["perturbed"], o["start"], local):
            assert torch.allclose(p.double(), s.double() + RHO * g.double() / norm, atol=1e-6, rtol=1e-5)
        expected_second.append(_local_grads(o["perturbed"], _rank_batch(rank)))
    assert not all(torch.allclose(a, b) for a, b in zip(out[0]["first"], out[1]["first"])), "ranks had equal grads"
    mean = [(a + b) / 2 for a, b in zip(*expected_second)]
    for o in out:  # the descent used the all-reduced gradient, the same on both ranks
        for g, m in zip(o["second"], mean):
            assert torch.allclose(g, m, atol=1e-6, rtol=1e-5)
        for f, s, m in zip(o["final"], o["start"], mean):
            assert torch.allclose(f, s - LR * m, atol=1e-6, rtol=1e-5)
    for a, b in zip(out[0]["final"], out[1]["final"]):
        assert torch.equal(a, b)
