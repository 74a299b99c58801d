"""Post-hoc EMA math (swm_fused.posthoc) against its closed forms and against brute-force sums."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from swm_fused import posthoc


def test_sigma_rel_and_gamma_round_trip():
    for sigma in np.linspace(0.005, 0.285, 57):
        gamma = posthoc.sigma_rel_to_gamma(sigma)
        assert gamma >= 0
        assert abs(posthoc.gamma_to_sigma_rel(gamma) - sigma) < 1e-12
    for gamma in [0.0, 0.5, 3.0, 6.94, 16.97, 100.0, 1e4]:
        assert abs(posthoc.sigma_rel_to_gamma(posthoc.gamma_to_sigma_rel(gamma)) - gamma) < 1e-6 * max(1, gamma)


def test_edm2_published_pair():
    """EDM2 tracks sigma_rel 0.05 and 0.10, which the paper gives as gamma 16.97 and 6.94."""
    assert posthoc.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert posthoc.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.3, 1.0, float("nan")])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must"):
        posthoc.sigma_rel_to_gamma(bad)


def _closed_form_weights(times, gamma):
    """Weight of the iterate at times[j] after updates at each of `times`: the profile's mass on
    (times[j-1], times[j]] = (t_j / t_n)**(gamma+1) - (t_{j-1} / t_n)**(gamma+1)."""
    t = np.asarray(times, dtype=np.float64)
    edges = np.concatenate([[0.0], t]) / t[-1]
    return edges[1:] ** (gamma + 1) - edges[:-1] ** (gamma + 1)


@pytest.mark.parametrize("sigma", [0.05, 0.10, 0.2])
def test_beta_keeps_the_power_function_profile_for_any_spacing(sigma):
    gamma = posthoc.sigma_rel_to_gamma(sigma)
    times = np.cumsum([random.choice([1, 1, 2, 7, 10]) for _ in range(300)])
    betas = [posthoc.power_function_beta(t, t - prev, gamma) for prev, t in zip(np.concatenate([[0], times]), times)]
    assert betas[0] == 0.0  # the first update copies
    got = posthoc.profile_weights(times, list(zip(times, betas)))
    np.testing.assert_allclose(got, _closed_form_weights(times, gamma), rtol=1e-9, atol=1e-15)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_updating_every_10_steps_equals_10_single_steps_on_a_blockwise_constant_trajectory():
    gamma = posthoc.sigma_rel_to_gamma(0.08)
    steps = np.arange(1, 1001)
    single = posthoc.profile_weights(steps, [(t, posthoc.power_function_beta(t, 1, gamma)) for t in steps])
    every10 = steps[9::10]
    coarse = posthoc.profile_weights(every10, [(t, posthoc.power_function_beta(t, 10, gamma)) for t in every10])
    np.testing.assert_allclose(coarse, single.reshape(-1, 10).sum(axis=1), rtol=1e-9, atol=1e-15)


def test_beta_bad_arguments():
    with pytest.raises(ValueError, match="0 < dt <= t"):
        posthoc.power_function_beta(5, 6, 1.0)
    with pytest.raises(ValueError, match="0 < dt <= t"):
        posthoc.power_function_beta(5, 0, 1.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        posthoc.power_function_beta(5, 1, -2.0)


def test_inner_product_matches_numerical_integration():
    for _ in range(20):
        t_a, t_b = random.uniform(1, 100), random.uniform(1, 100)
        g_a, g_b = random.uniform(0, 20), random.uniform(0, 20)
        tau = np.linspace(0, min(t_a, t_b), 200001)
        p_a = (g_a + 1) * tau ** g_a / t_a ** (g_a + 1)
        p_b = (g_b + 1) * tau ** g_b / t_b ** (g_b + 1)
        numeric = np.trapezoid(p_a * p_b, tau)
        assert posthoc.profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-5)


def _discrete_profile(times_all, t_end, sigma):
    """Weights over iterates 1..T of an EMA tracked with one update per step up to t_end (0 after)."""
    gamma = posthoc.sigma_rel_to_gamma(sigma)
    steps = times_all[times_all <= t_end]
    w = posthoc.profile_weights(steps, [(t, posthoc.power_function_beta(t, 1, gamma)) for t in steps])
    return np.concatenate([w, np.zeros(len(times_all) - len(w))])


def test_reconstruction_matches_the_target_profile_far_better_than_either_input():
    steps = np.arange(1, 4001)
    snapshots = [(t, s) for t in range(400, 4001, 400) for s in (0.05, 0.10)]
    target = (4000, 0.075)
    x = posthoc.solve_coefficients(snapshots, target)
    assert x.sum() == pytest.approx(1.0, abs=1e-12)
    reconstructed = sum(xi * _discrete_profile(steps, t, s) for xi, (t, s) in zip(x, snapshots))
    want = _discrete_profile(steps, *target)
    error = np.linalg.norm(reconstructed - want)
    spread = np.linalg.norm(_discrete_profile(steps, 4000, 0.05) - _discrete_profile(steps, 4000, 0.10))
    assert error < 0.05 * spread, (error, spread)


def test_denser_snapshots_reconstruct_better():
    steps = np.arange(1, 2401)
    target = (2400, 0.07)
    errors = []
    for every in (1200, 600, 300):
        snapshots = [(t, s) for t in range(every, 2401, every) for s in (0.05, 0.10)]
        x = posthoc.solve_coefficients(snapshots, target)
        reconstructed = sum(xi * _discrete_profile(steps, t, s) for xi, (t, s) in zip(x, snapshots))
        errors.append(np.linalg.norm(reconstructed - _discrete_profile(steps, *target)))
    assert errors[0] > errors[1] > errors[2], errors


def test_snapshots_after_the_target_get_no_weight():
    snapshots = [(t, s) for t in (100, 200, 300) for s in (0.05, 0.1)]
    x = posthoc.solve_coefficients(snapshots, (200, 0.08))
    assert all(x[i] == 0 for i, (t, _) in enumerate(snapshots) if t > 200)
    assert x.sum() == pytest.approx(1.0)


def test_bad_reconstruction_requests():
    with pytest.raises(ValueError, match="at least two distinct"):
        posthoc.solve_coefficients([(100, 0.05), (100, 0.05)], (100, 0.07))
    with pytest.raises(ValueError, match="no snapshot was taken at the target time 150"):
        posthoc.solve_coefficients([(100, 0.05), (100, 0.1), (200, 0.05)], (150, 0.07))
    with pytest.raises(ValueError, match="sigma_rel must"):
        posthoc.solve_coefficients([(100, 0.05), (100, 0.1)], (100, 0.5))
    with pytest.raises(ValueError, match="sigma_rel must"):
        posthoc.solve_coefficients([(100, 0.05), (100, 0.4)], (100, 0.07))
    with pytest.raises(TypeError, match="target t must be a real number"):
        posthoc.solve_coefficients([(100, 0.05), (100, 0.1)], ("100", 0.07))
    assert math.isfinite(posthoc.solve_coefficients([(100, 0.05), (100, 0.1)], (100, 0.07)).sum())
