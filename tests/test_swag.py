"""swm_fused.SWAG against float64 numpy oracles and the sampling formula's own statistics."""
from __future__ import annotations

import io
import math
from typing import List
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import swm_fused
from swm_fused import SWAG, dispatch

from _helpers import assert_close

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class OddShapes(nn.Module):
    """Odd tensor sizes (so the flat layout has padding), a BatchNorm with buffers, and a bare parameter."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = nn.Linear(7, 5)
        self.norm = nn.BatchNorm1d(5)
        self.extra = nn.Parameter(torch.randn(3, 1, 3))
        self.to(dtype)


def flat_params(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten().to("cpu", torch.float64) for p in model.parameters()]).numpy()


@torch.no_grad()
def set_params(model: nn.Module, flat: torch.Tensor) -> None:
    start = 0
    for p in model.parameters():
        p.copy_(flat[start:start + p.numel()].view_as(p))
        start += p.numel()


def random_trajectory(model: nn.Module, count: int, spread: float = 1.0) -> List[torch.Tensor]:
    """``count`` parameter vectors around a random centre, far from zero so the moments are non-trivial."""
    n = sum(p.numel() for p in model.parameters())
    centre = 3 * torch.randn(n, dtype=torch.float64)
    return [centre + spread * torch.randn(n, dtype=torch.float64) for _ in range(count)]


def collect_all(swag: SWAG, model: nn.Module, thetas: List[torch.Tensor]) -> List[np.ndarray]:
    """Collect every theta; return the values as stored in the model (what SWAG actually saw)."""
    seen = []
    for theta in thetas:
        set_params(model, theta)
        seen.append(flat_params(model))
        swag.collect()
    return seen


def oracle_deviations(seen: List[np.ndarray]) -> List[np.ndarray]:
    """theta_j minus the mean of theta_0..theta_j (the mean *after* collecting theta_j)."""
    return [seen[j] - np.mean(seen[:j + 1], axis=0) for j in range(len(seen))]


def state_vector(state, key: str) -> np.ndarray:
    return torch.cat([state[key][n].flatten() for n in state["names"]]).to(torch.float64).cpu().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_moments_match_float64(dtype, device):
    model = OddShapes(dtype).to(device)
    swag = SWAG(model, max_rank=5)
    assert swag.device == model.linear.weight.device
    seen = collect_all(swag, model, random_trajectory(model, 60))
    state = swag.state_dict()
    assert swag.n_collected == state["n_collected"] == 60 and swag.rank == 5
    seen_arr = np.stack(seen)
    # fp32 running means of values up to ~10 (squares up to ~100) over 60 steps.
    assert_close(torch.from_numpy(state_vector(state, "mean")), torch.from_numpy(seen_arr.mean(0)),
                 atol=1e-5, rtol=1e-5, what="mean")
    assert_close(torch.from_numpy(state_vector(state, "sq_mean")), torch.from_numpy((seen_arr ** 2).mean(0)),
                 atol=1e-4, rtol=1e-5, what="sq_mean")
    for tensor in [*state["mean"].values(), *state["sq_mean"].values(), state["deviations"]]:
        assert tensor.dtype == torch.float32 and tensor.device == swag.device


def test_mean_state_dict_loads_into_the_model_and_keeps_buffers():
    model = OddShapes(torch.bfloat16)
    swag = SWAG(model)
    seen = collect_all(swag, model, random_trajectory(model, 9))
    model.norm.running_mean.normal_()
    mean_sd = swag.mean_state_dict()
    assert mean_sd.keys() == model.state_dict().keys()
    assert torch.equal(mean_sd["norm.running_mean"], model.norm.running_mean)
    assert torch.equal(mean_sd["norm.num_batches_tracked"], model.norm.num_batches_tracked)
    model.load_state_dict(mean_sd)
    state = swag.state_dict()
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, state["mean"][name].to(torch.bfloat16)), name
    # The fp32 mean itself is checked against float64 in test_moments_match_float64; here, one bf16 ulp.
    np.testing.assert_allclose(flat_params(model), np.mean(seen, axis=0), rtol=2 ** -8, atol=1e-6)


def test_collect_is_one_swag_pass_over_one_flat_storage():
    model = OddShapes()
    swag = SWAG(model, max_rank=3)
    kernels = dispatch.select(torch.device("cpu")).kernels
    with mock.patch.object(kernels, "swag_", wraps=kernels.swag_) as spy:
        swag.collect()
        swag.collect()
    assert spy.call_count == 2
    for call in spy.call_args_list:
        means, sq_means, srcs = call.args[:3]
        assert len(means) == len(sq_means) == len(srcs) == 1 and means[0].dim() == 1


def test_ring_buffer_holds_the_last_max_rank_deviations():
    model = OddShapes()
    max_rank = 4
    swag = SWAG(model, max_rank=max_rank)
    thetas = random_trajectory(model, 11)
    seen = collect_all(swag, model, thetas[:3])
    partial = swag.state_dict()["deviations"].double().numpy()
    expected = oracle_deviations(seen)
    for slot in range(3):
        np.testing.assert_allclose(partial[slot], expected[slot], atol=1e-5, rtol=1e-5, err_msg=f"slot {slot}")
    assert not partial[3].any(), "an unused slot must stay zero"

    seen += collect_all(swag, model, thetas[3:])
    ring = swag.state_dict()["deviations"].double().numpy()
    assert ring.shape == (max_rank, sum(p.numel() for p in model.parameters()))
    expected = oracle_deviations(seen)
    for j in range(len(seen) - max_rank, len(seen)):  # collections 7..10 live in slots 3, 0, 1, 2
        np.testing.assert_allclose(ring[j % max_rank], expected[j], atol=1e-5, rtol=1e-5,
                                   err_msg=f"collection {j} in slot {j % max_rank}")


def _sample_many(swag: SWAG, model: nn.Module, count: int, **kwargs) -> np.ndarray:
    out = np.empty((count, sum(p.numel() for p in model.parameters())))
    for i in range(count):
        swag.sample(**kwargs)
        out[i] = flat_params(model)
    return out


def _check_statistics(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray, sigmas: float = 5.0) -> None:
    """Empirical mean and covariance vs the formula, each entry within `sigmas` standard errors.

    For n Gaussian samples the sample mean of coordinate i has variance cov_ii / n, and the
    sample covariance entry (i, j) has variance (cov_ii cov_jj + cov_ij^2) / n.
    """
    n = samples.shape[0]
    var = np.diag(cov)
    mean_err = np.abs(samples.mean(0) - mean)
    mean_tol = sigmas * np.sqrt(var / n)
    assert (mean_err <= mean_tol).all(), f"mean off by {np.max(mean_err / mean_tol):.2f}x the tolerance"
    emp_cov = np.cov(samples, rowvar=False)
    cov_tol = sigmas * np.sqrt((np.outer(var, var) + cov ** 2) / n)
    cov_err = np.abs(emp_cov - cov)
    worst = np.unravel_index(np.argmax(cov_err / cov_tol), cov.shape)
    assert (cov_err <= cov_tol).all(), (f"covariance entry {worst} is {emp_cov[worst]:.4g}, expected "
                                        f"{cov[worst]:.4g} +- {cov_tol[worst]:.3g}")


def test_sample_statistics_match_the_swag_covariance():
    """4000 samples of a 20-parameter model; tolerances are 5 standard errors per entry.

    The trajectory has a strong rank-3 component plus small isotropic noise, so the low-rank
    term dominates the covariance: a wrong 1/(K-1) factor (-20% at K=6), scale instead of
    sqrt(scale), or a missing term moves entries by far more than 5 standard errors
    (about 11% of an entry at n=4000).
    """
    model = nn.Linear(4, 4)
    n = 20
    k, scale, count = 6, 0.5, 4000
    centre = 2 * torch.randn(n, dtype=torch.float64)
    directions = torch.randn(3, n, dtype=torch.float64)
    thetas = [centre + torch.randn(3, dtype=torch.float64) @ directions + 0.1 * torch.randn(n, dtype=torch.float64)
              for _ in range(25)]
    swag = SWAG(model, max_rank=k)
    seen = collect_all(swag, model, thetas)
    seen_arr = np.stack(seen)
    mean = seen_arr.mean(0)
    var = (seen_arr ** 2).mean(0) - mean ** 2
    dev = np.stack(oracle_deviations(seen)[-k:])
    low_rank = dev.T @ dev / (k - 1)

    _check_statistics(_sample_many(swag, model, count, scale=scale), mean, scale * (np.diag(var) + low_rank))
    _check_statistics(_sample_many(swag, model, count, scale=scale, diag_only=True), mean, scale * np.diag(var))


def test_sample_is_seeded_and_leaves_the_state_alone():
    model = OddShapes()
    swag = SWAG(model, max_rank=5)
    collect_all(swag, model, random_trajectory(model, 8))
    before = swag.state_dict()
    pointers = [p.data_ptr() for p in model.parameters()]

    def draw(**kwargs) -> np.ndarray:
        swag.sample(**kwargs)
        return flat_params(model)

    first = draw(seed=1234)
    np.testing.assert_array_equal(draw(seed=1234), first)
    assert not np.array_equal(draw(seed=1235), first)
    assert not np.array_equal(draw(seed=1234, diag_only=True), first)
    torch.manual_seed(7)
    unseeded = draw()
    torch.manual_seed(7)
    np.testing.assert_array_equal(draw(), unseeded)
    assert [p.data_ptr() for p in model.parameters()] == pointers, "sample must write in place, not rebind"
    after = swag.state_dict()
    for key in ("mean", "sq_mean"):
        assert all(torch.equal(before[key][n], after[key][n]) for n in before["names"])
    assert torch.equal(before["deviations"], after["deviations"])


def test_scale_zero_gives_the_mean_and_single_model_has_no_low_rank_term():
    model = OddShapes()
    swag = SWAG(model, max_rank=4)
    seen = collect_all(swag, model, random_trajectory(model, 1))
    swag.sample(scale=0.0, seed=3)
    np.testing.assert_array_equal(flat_params(model), seen[0])  # the mean of one model is that model
    swag.sample(scale=2.0, seed=3)
    full = flat_params(model)
    swag.sample(scale=2.0, seed=3, diag_only=True)
    np.testing.assert_array_equal(flat_params(model), full)  # K = 1: no low-rank term to add


def test_max_rank_zero_is_swag_diagonal():
    model = OddShapes()
    swag = SWAG(model, max_rank=0)
    seen = np.stack(collect_all(swag, model, random_trajectory(model, 10)))
    state = swag.state_dict()
    assert state["deviations"].shape == (0, seen.shape[1])
    np.testing.assert_allclose(state_vector(state, "mean"), seen.mean(0), atol=1e-5, rtol=1e-5)
    swag.sample(seed=0)
    assert np.isfinite(flat_params(model)).all()


def test_resume_continues_exactly():
    thetas = random_trajectory(OddShapes(), 13)
    model_a = OddShapes()
    swag_a = SWAG(model_a, max_rank=4, var_clamp=1e-8)
    collect_all(swag_a, model_a, thetas[:6])
    buffer = io.BytesIO()
    torch.save(swag_a.state_dict(), buffer)

    model_b = OddShapes()
    swag_b = SWAG(model_b, max_rank=4)
    buffer.seek(0)
    swag_b.load_state_dict(torch.load(buffer))
    assert swag_b.var_clamp == 1e-8 and swag_b.n_collected == 6
    collect_all(swag_a, model_a, thetas[6:])
    collect_all(swag_b, model_b, thetas[6:])

    state_a, state_b = swag_a.state_dict(), swag_b.state_dict()
    assert state_a["n_collected"] == state_b["n_collected"] == 13
    for key in ("mean", "sq_mean"):
        for name in state_a["names"]:
            assert torch.equal(state_a[key][name], state_b[key][name]), f"{key}[{name}]"
    assert torch.equal(state_a["deviations"], state_b["deviations"])
    swag_a.sample(seed=11)
    swag_b.sample(seed=11)
    np.testing.assert_array_equal(flat_params(model_a), flat_params(model_b))


def _corrupt(state, case):
    if case == "missing key":
        del state["sq_mean"]
    elif case == "renamed parameter":
        state["names"][0] = "other.weight"
        state["mean"]["other.weight"] = state["mean"].pop("linear.weight")
    elif case == "moment shape":
        state["mean"]["linear.bias"] = torch.randn(6)
    elif case == "max_rank":
        state["max_rank"] = 3
        state["deviations"] = state["deviations"][:3]
    elif case == "deviation shape":
        state["deviations"] = torch.randn(4, 5)
    return state


@pytest.mark.parametrize("case,pattern", [
    ("missing key", "missing key.*sq_mean"),
    ("renamed parameter", "other.weight"),
    ("moment shape", r"linear\.bias.*\(6,\).*\(5,\)"),
    ("max_rank", "max_rank=3"),
    ("deviation shape", r"deviations has shape \(4, 5\)"),
])
def test_load_state_dict_rejects_mismatches_and_writes_nothing(case, pattern):
    model = OddShapes()
    swag = SWAG(model, max_rank=4)
    collect_all(swag, model, random_trajectory(model, 5))
    bad = _corrupt(SWAG(model, max_rank=4).state_dict(), case)
    before = swag.state_dict()
    with pytest.raises(ValueError, match=pattern):
        swag.load_state_dict(bad)
    after = swag.state_dict()
    assert after["n_collected"] == before["n_collected"]
    assert torch.equal(after["deviations"], before["deviations"])
    assert all(torch.equal(after["mean"][n], before["mean"][n]) for n in before["names"])


def test_other_architecture_is_rejected():
    small, large = nn.Linear(3, 2), nn.Linear(3, 4)
    state = SWAG(large, max_rank=2).state_dict()
    with pytest.raises(ValueError, match=r"weight.*\(4, 3\).*\(2, 3\)"):
        SWAG(small, max_rank=2).load_state_dict(state)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda m: SWAG(object()), TypeError, "torch.nn.Module"),
    (lambda m: SWAG(m, max_rank=-1), ValueError, "max_rank"),
    (lambda m: SWAG(m, max_rank=2.0), TypeError, "max_rank"),
    (lambda m: SWAG(m, var_clamp=-1.0), ValueError, "var_clamp"),
    (lambda m: SWAG(nn.ReLU()), ValueError, "no parameters"),
    (lambda m: SWAG(m).sample(), RuntimeError, "collect"),
])
def test_bad_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs,error", [({"scale": -0.1}, ValueError), ({"scale": "1"}, TypeError),
                                          ({"seed": 1.5}, TypeError)])
def test_bad_sample_arguments_write_nothing(kwargs, error):
    model = nn.Linear(3, 3)
    swag = SWAG(model)
    swag.collect()
    before = flat_params(model)
    with pytest.raises(error):
        swag.sample(**kwargs)
    np.testing.assert_array_equal(flat_params(model), before)


def test_parameters_on_two_devices_are_rejected():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        SWAG(model)


def test_exported_from_the_package():
    assert swm_fused.SWAG is SWAG
    assert math.isclose(SWAG(nn.Linear(2, 2)).var_clamp, 1e-30)
