"""No op path waits for the device: every public op, on every backend and device, runs with the
host-sync entry points (``Tensor.item``, ``.cpu()``, ``bool()``/``float()`` of a tensor, ``torch.cuda.synchronize``)
patched to raise. (On CUDA, tests/test_cuda.py also runs the ops under torch's sync debug mode.)"""
from __future__ import annotations

import contextlib
from typing import Tuple

import pytest
import torch

import swm_fused
from swm_fused import FlatBuffer, use_backend
from _cases import random_tensor, row_id, rows


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    forbid_host_sync(monkeypatch)


def forbid_host_sync(monkeypatch, also: Tuple[str, ...] = ()) -> None:
    """Patch the host-sync entry points (and the Tensor methods named in ``also``) to raise HostSync."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise HostSync(f"{name} was called inside an op")
        return call
    for name in ("item", "cpu", "__bool__", "__float__", "__int__", *also):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden("torch.cuda.synchronize"))
    monkeypatch.setattr(torch.cuda.Event, "synchronize", forbidden("torch.cuda.Event.synchronize"))
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", forbidden("torch.cuda.Stream.synchronize"))


def _every_op(device: torch.device) -> None:
    shapes = [(4097,), (7, 3), (1,)]
    avg = [random_tensor(s, torch.float32, device) for s in shapes]
    sq = [a * a for a in avg]
    src = [random_tensor(s, torch.bfloat16, device) for s in shapes]
    out = [torch.empty(s, dtype=torch.float16, device=device) for s in shapes]
    n = torch.tensor(3, device=device)
    flat_avg, flat_src = FlatBuffer.from_tensors(avg), FlatBuffer.from_tensors(src)
    flag = swm_fused.any_nonfinite(src + [torch.ones(2, dtype=torch.int64, device=device)])
    swm_fused.ema_(avg, src, 0.99, found_inf=flag)
    swm_fused.swa_(avg, src, n, found_inf=flag)
    swm_fused.swa_(avg, src, 5)
    swm_fused.swag_(avg, sq, src, n, found_inf=flag)
    swm_fused.ema_multi_([avg, sq], src, [0.1, 0.01], found_inf=flag)
    swm_fused.merge_(out, [avg, src, sq], [0.5, -0.25, 0.75])
    swm_fused.merge_(out, [avg, src], torch.tensor([0.5, 0.5]))
    swm_fused.ema_(flat_avg, flat_src, 0.9, found_inf=swm_fused.any_nonfinite(flat_src))
    saved = [torch.empty_like(a) for a in avg]
    scale = 0.05 / (swm_fused.sq_norm(src, scale=avg).sqrt() + 1e-12)
    swm_fused.sam_ascent_(avg, src, saved, scale, adaptive=True, found_inf=flag)
    swm_fused.sam_ascent_(avg, src, saved, 0.05 / (swm_fused.sq_norm(src).sqrt() + 1e-12))
    swm_fused.merge_(avg, [saved], [1.0])  # SAM's restore
    swm_fused.sq_norm(flat_src, scale=flat_avg)
    bands = torch.rand(2, len(shapes), 2, dtype=torch.float64, device=device)
    swm_fused.ties_merge_(out, [avg, src], [0.7, -0.4], base=saved, thresholds=bands, normalize=True, scale=0.9)
    swm_fused.ties_merge_(out, [avg, src, sq], [0.5, 1.0, 0.25], majority_sign="count", task_vectors=True)
    swm_fused.ties_merge_(flat_avg, [flat_src, flat_avg], [0.5, 0.5], majority_sign=None)
    u = [torch.rand(s, device=device) for s in shapes]
    swm_fused.dare_drop_(avg, u, 0.3)
    swm_fused.dare_drop_(avg, u, [t.double() * 0.5 + 0.25 for t in u], rescale=False)


@pytest.mark.parametrize("row", rows(), ids=row_id)
def test_no_op_path_synchronises(row, no_host_sync):
    backend, device = row
    with use_backend(backend):
        _every_op(device)
    with pytest.raises(HostSync):  # the patches are live
        torch.zeros(1).item()


def test_automatic_choice_does_not_synchronise_either(no_host_sync):
    for device in {r[1] for r in rows()}:
        _every_op(device)


@pytest.mark.parametrize("row", rows(), ids=row_id)
def test_bound_step_multi_and_posthoc_update_multi_do_not_synchronise(row, monkeypatch):
    """BoundLists.step_multi_ (K profiles, NaN check, counters) and PostHocEMA.update, which runs it,
    never wait for the device (built first: construction may copy to the host)."""
    from swm_fused.posthoc import PostHocEMA

    backend, device = row
    shapes = [(4097,), (7, 3), (1,)]
    with use_backend(backend):
        avgs = [[random_tensor(s, torch.float32, device) for s in shapes] for _ in range(3)]
        src = [random_tensor(s, torch.bfloat16, device) for s in shapes]
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(3)]
        skipped = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(3)]
        handle = swm_fused.BoundLists(*avgs, src)
        model = {"w": random_tensor((33, 5), torch.bfloat16, device), "b": random_tensor((5,), torch.float32, device)}
        phema = PostHocEMA(model, sigma_rels=(0.05, 0.1))
        forbid_host_sync(monkeypatch)
        handle.step_multi_([0.1, 0.2, 0.3], counts, skipped=skipped)
        handle.step_multi_([0.1, 0.2, 0.3], counts, skip_nonfinite=False)
        for _ in range(3):
            phema.update()
    with pytest.raises(HostSync):  # the patches are live
        torch.zeros(1).item()


@pytest.mark.parametrize("mode", ["ema", "swa"])
@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
@pytest.mark.parametrize("backend", [None, "reference"], ids=["automatic", "forced-reference"])
def test_weight_averager_update_does_not_synchronise(mode, flat, backend, monkeypatch):
    """WeightAverager.update() never waits for the device, on the one-C-call fast path (automatic backend), on
    the full path (a forced backend), through a NaN-skipped step and, for lists, a replaced parameter that
    makes it re-pair. tests/test_cuda_graph.py's capture relies on this; here the averages must still
    equal a float64 oracle."""
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.LayerNorm(17), torch.nn.Linear(17, 3))
    model = model.to(torch.bfloat16)
    if flat:
        swm_fused.flatten_parameters(model)
    warmup = swm_fused.EMAWarmup(warmup_power=0.75) if mode == "ema" else None
    averager = swm_fused.WeightAverager(model, mode=mode, decay=0.8, warmup=warmup)
    oracle: dict = {}
    averaged = 0
    forbid_host_sync(monkeypatch)
    with use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(1, 7):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, dtype=torch.float32).to(p.dtype))
                if step == 4 and not flat:
                    model[2].bias = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))  # re-paired by name
                poisoned = step == 3
                if poisoned:
                    saved = model[0].weight[1, 2].clone()
                    model[0].weight[1, 2] = float("nan")
            averager.update()
            if poisoned:
                with torch.no_grad():
                    model[0].weight[1, 2] = saved
                continue
            current = {n: p.detach().double() for n, p in model.named_parameters()}
            averaged += 1
            if mode == "ema":
                decay = warmup.decay_at(step, 0.8)  # the host schedule counts every update() call
                oracle = {n: (decay * oracle[n] + (1 - decay) * x if oracle else x) for n, x in current.items()}
            else:
                oracle = {n: (oracle[n] + (x - oracle[n]) / averaged if oracle else x) for n, x in current.items()}
    with pytest.raises(HostSync):  # the patches were live
        torch.zeros(1).item()
    monkeypatch.undo()
    assert averager.n_averaged == averaged and averager.skipped == 1
    for name, value in averager.average_state_dict().items():
        torch.testing.assert_close(value.double(), oracle[name], atol=1e-6, rtol=1e-5, msg=name)
