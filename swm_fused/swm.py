"""SWM: merging the weight averages of several training trajectories, with a connectivity check.

Averaging weights only works inside one basin of the loss. SWA/EMA averages points along
*one* run; SWM goes one step further and merges the averages of *several* runs, which pays
off when those runs stay linearly mode connected (Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis", https://arxiv.org/abs/1912.05671): the loss
along the straight line between them never rises much above the line between the end points.
That holds for runs that **share an initialisation, or branch from one early checkpoint**, and
differ only in data order, augmentation or late hyperparameters. Runs from different random
initialisations usually sit in different basins (hidden units are permuted, among other
things), and their average is a much worse model than either.

- :func:`interpolation_barrier` measures that: the loss along the segment and its barrier.
- :func:`merge_trajectories` merges the averages, and when given an ``eval_fn`` it checks every
  trajectory against the first and warns (:class:`HighBarrierWarning`) above a threshold.

Everywhere in this module ``eval_fn(state_dict) -> float`` returns a **loss: lower is better**
(a validation loss or an error rate). Every merge, the interpolation points included, runs
through :func:`swm_fused.merge_` (via :mod:`swm_fused.merge`).
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .averager import WeightAverager

StateDict = Dict[str, Tensor]
LossFn = Callable[[StateDict], Union[float, Tensor]]
Trajectory = Union[Mapping[str, Tensor], str, "os.PathLike[str]", "WeightAverager"]

DEFAULT_BARRIER_THRESHOLD = 0.02


class HighBarrierWarning(UserWarning):
    """Two trajectories passed to :func:`merge_trajectories` are not linearly connected.

    The loss barrier between them exceeded ``barrier_threshold``, so their merge is likely
    worse than either. Usually the runs did not share an initialisation.
    """


@dataclass(frozen=True)
class InterpolationBarrier:
    """The loss along ``(1 - alpha) * sd_a + alpha * sd_b`` and its barrier height.

    Attributes:
        alphas: the interpolation coefficients, ``linspace(0, 1, steps)``.
        losses: ``eval_fn`` at each alpha (``losses[0]`` is ``sd_a``, ``losses[-1]`` is ``sd_b``).
        barrier: ``max_alpha loss(alpha) - ((1 - alpha) * loss(0) + alpha * loss(1))``; at least
            0, since the end points lie on the line. ``inf`` if an interior loss is ``inf``.
    """

    alphas: Tuple[float, ...]
    losses: Tuple[float, ...]
    barrier: float

    @property
    def worst_alpha(self) -> float:
        """The alpha where the loss rises furthest above the line between the end points."""
        excess = [loss - ((1 - a) * self.losses[0] + a * self.losses[-1])
                  for a, loss in zip(self.alphas, self.losses)]
        return self.alphas[max(range(len(excess)), key=excess.__getitem__)]


def _check_eval_fn(where: str, eval_fn: Any) -> None:
    if not callable(eval_fn):
        raise TypeError(f"{where}: eval_fn must be callable (state_dict -> loss), got {type(eval_fn).__name__}")


def _loss(eval_fn: LossFn, state_dict: StateDict, what: str) -> float:
    """``eval_fn(state_dict)`` as a float; NaN is refused, +-inf passes (a diverged model)."""
    value = eval_fn(state_dict)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eval_fn must return a real number (a loss, lower is better); got {value!r} for {what}")
    if math.isnan(value):
        raise ValueError(f"eval_fn returned NaN for {what}")
    return float(value)


def interpolation_barrier(sd_a: Mapping[str, Tensor], sd_b: Mapping[str, Tensor], eval_fn: LossFn,
                          steps: int = 11) -> InterpolationBarrier:
    """Loss along the straight line from ``sd_a`` to ``sd_b`` and its barrier (Frankle et al. 2020).

    For each ``alpha`` in ``linspace(0, 1, steps)`` the point ``(1 - alpha) * sd_a + alpha * sd_b``
    is built with one fused :func:`swm_fused.merge_` (floating tensors in ``sd_a``'s dtypes,
    non-floating entries copied from ``sd_a``) and passed to ``eval_fn``, which returns a loss
    (lower is better). The barrier is the largest excess of that loss over the linear
    interpolation of the end-point losses. A small barrier means the two models are linearly
    mode connected and can be averaged; runs from different random inits usually are not.
    Models with BatchNorm need their statistics recomputed at each point (do it in ``eval_fn``).

    Args:
        sd_a, sd_b: state dicts with the same keys and shapes.
        eval_fn: ``state_dict -> loss``; called ``steps`` times, each time with a new dict.
        steps: number of points including both ends (>= 2).

    Returns:
        An :class:`InterpolationBarrier` with ``alphas``, ``losses`` and ``barrier``.

    Raises:
        ValueError: key or shape mismatch, ``steps < 2``, a NaN loss, or a non-finite loss at
            an end point. TypeError: ``eval_fn`` is not callable or returns a non-number.
    """
    from .merge import merge_state_dicts

    _check_eval_fn("interpolation_barrier", eval_fn)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"interpolation_barrier: steps must be an int, got {type(steps).__name__}")
    if steps < 2:
        raise ValueError(f"interpolation_barrier: steps must be >= 2 (both end points), got {steps}")
    alphas = tuple(i / (steps - 1) for i in range(steps))
    losses = []
    for alpha in alphas:
        point = merge_state_dicts([sd_a, sd_b], [1.0 - alpha, alpha], normalize=False)
        losses.append(_loss(eval_fn, point, f"alpha={alpha:g}"))
        del point  # one interpolated model alive at a time
    start, end = losses[0], losses[-1]
    for name, value in (("sd_a", start), ("sd_b", end)):
        if not math.isfinite(value):
            raise ValueError(f"interpolation_barrier: the loss of {name} is {value}; end points must be finite")
    barrier = max(loss - ((1.0 - a) * start + a * end) for a, loss in zip(alphas, losses))
    return InterpolationBarrier(alphas=alphas, losses=tuple(losses), barrier=barrier)


def _kind(index: int, average: Trajectory) -> str:
    """"state_dict", "averager" (anything with average_state_dict(), e.g. a WeightAverager) or "path"."""
    if isinstance(average, Mapping):
        return "state_dict"
    if callable(getattr(average, "average_state_dict", None)):
        return "averager"
    if isinstance(average, (str, os.PathLike)):
        return "path"
    raise TypeError(f"merge_trajectories: averages[{index}] is a {type(average).__name__}; expected a state "
                    "dict, a WeightAverager or a checkpoint path")


def _resolve(kind: str, average: Trajectory) -> StateDict:
    from .merge import load_state_dict

    if kind == "state_dict":
        return dict(average)
    if kind == "averager":
        return average.average_state_dict()
    return load_state_dict(average)


def merge_trajectories(averages: Sequence[Trajectory], weights: Union[str, Sequence[float], Tensor] = "uniform",
                       eval_fn: Optional[LossFn] = None, *,
                       barrier_threshold: Optional[float] = DEFAULT_BARRIER_THRESHOLD, barrier_steps: int = 11,
                       normalize: bool = True, dtype: Union[None, str, torch.dtype] = None) -> StateDict:
    """Merge the weight averages of several training trajectories into one state dict (SWM).

    The trajectories should **share an initialisation or branch from one early checkpoint**
    (then differ in data order, augmentation, seeds or late hyperparameters). Only then do they
    stay in one basin, where their average is at least as good as each; averages of runs from
    different random inits usually land on a high-loss ridge between basins. Pass ``eval_fn``
    to check: every trajectory is compared with the first by :func:`interpolation_barrier`, and
    a :class:`HighBarrierWarning` names the pairs whose barrier exceeds ``barrier_threshold``.

    Args:
        averages: K >= 1 trajectories, each a state dict, a :class:`~swm_fused.WeightAverager`
            (its ``average_state_dict()`` is used) or a checkpoint path (read with
            :func:`swm_fused.merge.load_state_dict`). All must hold the same keys and shapes.
        weights: ``"uniform"`` (the plain mean); a list of K numbers (scaled to sum to 1 unless
            ``normalize=False``); or ``"greedy"``: a greedy soup (Wortsman et al. 2022) of the
            trajectories ranked by ``eval_fn``, which keeps a trajectory only if it does not
            raise the soup's loss (:func:`swm_fused.merge.greedy_soup` on ``-eval_fn``).
        eval_fn: ``state_dict -> loss``, **lower is better** (a held-out loss or error rate).
            Required for ``"greedy"``; when given, it also drives the barrier check, which costs
            ``(K - 1) * barrier_steps`` calls.
        barrier_threshold: warn when a barrier exceeds this, in ``eval_fn``'s units; ``None``
            skips the check. The default 0.02 is Frankle et al.'s criterion (an error barrier
            under 2 points counts as stable) when ``eval_fn`` returns an error rate in [0, 1];
            set a threshold that suits other losses.
        barrier_steps: interpolation points per barrier (>= 2).
        normalize: scale a list of weights to sum to 1.
        dtype: output dtype of the floating tensors (default: the first trajectory's dtypes).

    Returns:
        The merged state dict (new tensors, on the first trajectory's device; non-floating
        entries copied from the first trajectory, or from the best one with ``"greedy"``).

    Raises:
        ValueError: no trajectories, an unknown ``weights`` string, a wrong number of weights,
            ``"greedy"`` without ``eval_fn``, or keys/shapes that differ. TypeError: an entry
            is neither a state dict, an averager nor a path. FileNotFoundError: a missing path.
    """
    from .merge import greedy_soup, merge_state_dicts

    where = "merge_trajectories"
    if isinstance(averages, (Mapping, str, os.PathLike)) or not isinstance(averages, Sequence):
        raise TypeError(f"{where}: averages must be a list of state dicts, WeightAveragers or paths, "
                        f"got {type(averages).__name__}")
    if len(averages) == 0:
        raise ValueError(f"{where}: averages is empty; give at least one trajectory")
    kinds = [_kind(k, average) for k, average in enumerate(averages)]
    if isinstance(weights, str):
        if weights not in ("uniform", "greedy"):
            raise ValueError(f"{where}: weights must be 'uniform', 'greedy' or a list of numbers, got {weights!r}")
        if weights == "greedy" and eval_fn is None:
            raise ValueError(f"{where}: weights='greedy' needs eval_fn (state_dict -> loss, lower is better)")
    elif (isinstance(weights, Tensor) and weights.dim() == 1) or isinstance(weights, Sequence):
        if len(weights) != len(averages):
            raise ValueError(f"{where}: got {len(weights)} weights for {len(averages)} trajectories")
    else:
        raise TypeError(f"{where}: weights must be 'uniform', 'greedy' or a list of numbers, "
                        f"got {type(weights).__name__}")
    if eval_fn is not None:
        _check_eval_fn(where, eval_fn)
    if barrier_threshold is not None and (isinstance(barrier_threshold, bool)
                                          or not isinstance(barrier_threshold, numbers.Real)
                                          or math.isnan(barrier_threshold)):
        raise TypeError(f"{where}: barrier_threshold must be a number or None, got {barrier_threshold!r}")
    if isinstance(barrier_steps, bool) or not isinstance(barrier_steps, numbers.Integral) or barrier_steps < 2:
        raise ValueError(f"{where}: barrier_steps must be an int >= 2, got {barrier_steps!r}")

    state_dicts = [_resolve(kind, average) for kind, average in zip(kinds, averages)]
    if eval_fn is not None and barrier_threshold is not None:
        _warn_on_barriers(state_dicts, eval_fn, float(barrier_threshold), barrier_steps)

    if isinstance(weights, str):
        if weights == "greedy":  # greedy_soup maximises a score: hand it the negated loss
            soup, _ = greedy_soup(state_dicts, lambda sd: -_loss(eval_fn, sd, "a greedy-soup candidate"),
                                  dtype=dtype)
            return soup
        return merge_state_dicts(state_dicts, None, dtype=dtype)
    return merge_state_dicts(state_dicts, weights, normalize=normalize, dtype=dtype)


def _warn_on_barriers(state_dicts: List[StateDict], eval_fn: LossFn, threshold: float, steps: int) -> None:
    """One HighBarrierWarning listing every trajectory whose barrier to trajectory 0 exceeds ``threshold``."""
    high = []
    for k in range(1, len(state_dicts)):
        result = interpolation_barrier(state_dicts[0], state_dicts[k], eval_fn, steps)
        if result.barrier > threshold:
            high.append(f"0 and {k}: barrier {result.barrier:.4g} at alpha={result.worst_alpha:g} "
                        f"(losses {result.losses[0]:.4g} and {result.losses[-1]:.4g} at the ends)")
    if high:
        warnings.warn(f"merge_trajectories: the loss rises above the line between the end points by more than "
                      f"barrier_threshold={threshold:g} between trajectories " + "; ".join(high)
                      + ". These runs are not linearly mode connected, so their merge is likely worse than "
                      "either; merge runs that share an initialisation or an early checkpoint.",
                      HighBarrierWarning, stacklevel=3)
