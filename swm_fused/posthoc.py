"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): track power-function EMA profiles while training, save snapshots of them, and after
training reconstruct the EMA of any length as a least-squares combination of the snapshots.

The math (equation numbers from the paper's arXiv version 2312.02696; docs/posthoc.md derives it):

- profile: the weight on iterate tau of an EMA at time t is proportional to tau**gamma, tau <= t;
- width (Eq. 123): ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))``;
- inverse (Eq. 126, Algorithm 2): gamma is the largest real root of
  ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma + (12 - sigma_rel**-2)``;
- per-update decay (Eq. 127): ``beta = (1 - dt / t) ** (gamma + 1)``, dt the training time since
  the previous update (the first update, dt = t, copies);
- inner product of two normalised profiles (Eq. 151, Algorithm 3), and the reconstruction
  (Algorithm 3): ``x = lstsq(A, b)``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p*>``, then x / sum(x).

Everything here is float64 numpy on the host: a handful of numbers per snapshot, never a tensor.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence, Tuple, Union

import numpy as np

MAX_SIGMA_REL = 12 ** -0.5
"""sigma_rel of gamma = 0, a uniform average (about 0.288675); wider profiles would need gamma < 0: rejected."""

Profile = Tuple[float, float]  # (t, sigma_rel): a snapshot's or a target's training time and width


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` >= 0 (Eq. 123)."""
    gamma = _real("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function profile of relative width ``sigma_rel`` (Eq. 126, Algorithm 2).

    ``sigma_rel`` must lie in (0, 0.288675]: 0.05 and 0.10 give about 16.97 and 6.94.
    """
    sigma_rel = _real("sigma_rel", sigma_rel)
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.6f}] (gamma >= 0), got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9 * max(1.0, s)].real.max())


def power_function_beta(t: float, dt: float, gamma: float) -> float:
    """The decay of an update at training time ``t``, ``dt`` after the previous one (Eq. 127).

    ``avg = beta * avg + (1 - beta) * model`` keeps the profile tau**gamma exactly, however
    unevenly the updates are spaced; ``dt == t`` (the first update) gives 0: a copy.
    """
    t, dt, gamma = _real("t", t), _real("dt", dt), _real("gamma", gamma)
    if not 0.0 < dt <= t:
        raise ValueError(f"need 0 < dt <= t, got t={t}, dt={dt}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return (1.0 - dt / t) ** (gamma + 1.0)


def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> of two normalised power-function profiles ending at t_a and t_b (Eq. 151).

    p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1) on [0, t], so the integral of p_a p_b is
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * min**(gamma_a + gamma_b + 1) / (t_a**(gamma_a+1) t_b**(gamma_b+1)).
    """
    ratio = t_a / t_b
    exponent = gamma_b if t_a < t_b else -gamma_a
    return (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent / ((gamma_a + gamma_b + 1) * max(t_a, t_b))


def solve_coefficients(snapshots: Sequence[Profile], target: Profile) -> np.ndarray:
    """Weights x (summing to 1) with sum_i x_i snapshot_i closest to the target profile (Algorithm 3).

    ``snapshots`` are (t_i, sigma_rel_i) pairs, ``target`` is (t*, sigma_rel*). Snapshots taken
    after t* are left out (weight 0). Raises ``ValueError`` when fewer than two distinct profiles
    remain, or when no snapshot was taken at t* itself (the end of the target's profile would not
    be covered).
    """
    t_star, s_star = _real("target t", target[0]), _real("target sigma_rel", target[1])
    if t_star <= 0:
        raise ValueError(f"target t must be > 0, got {t_star}")
    g_star = sigma_rel_to_gamma(s_star)
    profiles = [(_real(f"snapshots[{i}] t", t), _real(f"snapshots[{i}] sigma_rel", s))
                for i, (t, s) in enumerate(snapshots)]
    for i, (t, _) in enumerate(profiles):
        if t <= 0:
            raise ValueError(f"snapshots[{i}] has t={t}; times must be > 0")
    used = [i for i, (t, _) in enumerate(profiles) if t <= t_star]
    if not any(profiles[i][0] == t_star for i in used):
        times = sorted({t for t, _ in profiles})
        raise ValueError(f"no snapshot was taken at the target time {t_star:g} (snapshot times: "
                         f"{', '.join(f'{t:g}' for t in times[-5:])}{' ...' if len(times) > 5 else ''})")
    distinct = {profiles[i] for i in used}
    if len(distinct) < 2:
        raise ValueError(f"need at least two distinct snapshot profiles at or before t={t_star:g}, got {len(distinct)}")
    gammas = {i: sigma_rel_to_gamma(profiles[i][1]) for i in used}
    a = np.array([[profile_inner_product(profiles[i][0], gammas[i], profiles[j][0], gammas[j]) for j in used]
                  for i in used])
    b = np.array([profile_inner_product(profiles[i][0], gammas[i], t_star, g_star) for i in used])
    x_used = np.linalg.lstsq(a, b, rcond=None)[0]
    x = np.zeros(len(profiles))
    x[used] = x_used / x_used.sum()
    return x


def profile_weights(times: Iterable[float], updates: Sequence[Tuple[float, float]]) -> np.ndarray:
    """The weight each iterate carries in an EMA after ``updates`` [(t, beta), ...] (a test oracle).

    ``times`` are the training times of the iterates folded in, in order; update j folds iterate j
    with ``avg = beta_j * avg + (1 - beta_j) * theta_j``.
    """
    times = list(times)
    weights = np.zeros(len(times))
    for j, (_, beta) in enumerate(updates):
        weights[:j] *= beta
        weights[j] = 1.0 - beta
    return weights


def check_sigma_rels(sigma_rels: Union[float, Sequence[float]]) -> Tuple[float, ...]:
    """sigma_rel values as a tuple, each checked (a ValueError names the bad one)."""
    values = (sigma_rels,) if isinstance(sigma_rels, numbers.Real) else tuple(sigma_rels)
    if not values:
        raise ValueError("give at least one sigma_rel")
    for s in values:
        sigma_rel_to_gamma(s)
    return values
