"""SWAG: a Gaussian over weights from SGD iterates (Maddox et al. 2019, "A Simple Baseline
for Bayesian Uncertainty in Deep Learning", https://arxiv.org/abs/1902.02476).

:class:`SWAG` keeps, for a model's parameters, the running mean and mean of squares (one
fused :func:`swm_fused.swag_` pass over flat fp32 buffers per collection) and the last
``max_rank`` deviations ``theta - mean`` in a ring buffer. :meth:`SWAG.sample` draws
``mean + sqrt(scale) * (sqrt(var) * z1 + D^T z2 / sqrt(K - 1))`` into the model.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from .engine import AveragingEngine
from .ops import merge_

_STATE_KEYS = ("n_collected", "max_rank", "var_clamp", "names", "mean", "sq_mean", "deviations")


class SWAG:
    """SWA-Gaussian posterior over ``model``'s parameters, with a rank-``max_rank`` covariance.

    The module is not copied: SWAG keeps references to ``model``'s parameters (every tensor of
    ``model.named_parameters()``, frozen ones included), reads them in :meth:`collect` and writes
    into them in :meth:`sample`. All parameters must live on one device; the fp32 buffers
    (``mean``, ``sq_mean`` and the ``[max_rank, N]`` deviation ring) are allocated there, so
    memory is ``(2 + max_rank) * 4`` bytes per parameter element. Build SWAG after moving the
    model to its device: the buffers stay where the parameters were. Buffers such as BatchNorm
    statistics are not modelled; recompute them after :meth:`sample` (e.g. with
    ``torch.optim.swa_utils.update_bn``), as the paper does.

    Args:
        model: the module being trained.
        max_rank: how many recent deviations ``theta - mean`` to keep (the paper's K); 0 gives
            SWAG-diagonal.
        var_clamp: lower bound applied to ``sq_mean - mean**2`` before the square root, which
            fp32 cancellation can push slightly below zero.
    """

    def __init__(self, model: nn.Module, max_rank: int = 20, var_clamp: float = 1e-30):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SWAG: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral):
            raise TypeError(f"SWAG: max_rank must be an int, got {type(max_rank).__name__}")
        if max_rank < 0:
            raise ValueError(f"SWAG: max_rank must be >= 0, got {max_rank}")
        var_clamp = _check_var_clamp("SWAG", var_clamp)
        named = list(model.named_parameters())
        if not named:
            raise ValueError("SWAG: model has no parameters")
        device = named[0][1].device
        for name, p in named:
            if p.device != device:
                raise ValueError(f"SWAG: parameter {name!r} is on {p.device} but {named[0][0]!r} is on "
                                 f"{device}; all parameters must be on one device")
        self.model = model
        self.max_rank = int(max_rank)
        self.var_clamp = var_clamp
        self._names: List[str] = [name for name, _ in named]
        self._params: List[Tensor] = [p for _, p in named]
        # The moments live in one engine (one device, one fp32 storage each); the ring rows share
        # their layout, so every op below runs over one long vector.
        self._engine = AveragingEngine(named, dtype=torch.float32, skip_nonfinite=False, second_moment=True,
                                       what="SWAG")
        self._layout = self._engine.flat_average()
        self._deviations = torch.zeros(self.max_rank, self._layout.storages[0].numel(),
                                       dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        """The device holding the parameters and every SWAG buffer."""
        return self._deviations.device

    @property
    def _n_collected(self) -> int:
        return self._engine.attempts[0]

    @property
    def n_collected(self) -> int:
        """How many models :meth:`collect` has averaged."""
        return self._n_collected

    @property
    def rank(self) -> int:
        """K, the number of deviation rows in use: ``min(n_collected, max_rank)``."""
        return min(self._n_collected, self.max_rank)

    def _views(self, flat: Tensor) -> List[Tensor]:
        """Views of a flat vector laid out like the mean buffer, shaped like the parameters."""
        return self._layout.views_of(flat)

    @torch.no_grad()
    def collect(self) -> None:
        """Add the model's current parameters to the moments and the deviation ring.

        One fused :func:`swm_fused.swag_` pass updates ``mean`` and ``sq_mean``; then the
        deviation ``theta - mean`` is taken against the *updated* mean, as in the authors'
        code (``collect_model`` in wjmaddox/swa_gaussian, swag/posteriors/swag.py), and stored
        in ring slot ``n_collected % max_rank``, overwriting the oldest row once the ring is full.
        """
        if self.max_rank == 0:
            self._engine.update("swag")
        else:
            # The slot first receives theta (fp32), which then feeds the flat swag_ pass and
            # becomes theta - mean in place: no extra N-sized buffer.
            row = self._deviations[self._n_collected % self.max_rank]
            torch._foreach_copy_(self._views(row), [p.detach() for p in self._params])
            self._engine.update("swag", source=self._layout.like([row]))
            merge_(row, [row, self._layout.storages[0]], [1.0, -1.0])

    @torch.no_grad()
    def sample(self, scale: float = 0.5, diag_only: bool = False, seed: Optional[int] = None) -> None:
        """Draw weights from the SWAG posterior and write them into the model's parameters.

        ``theta = mean + sqrt(scale) * (sqrt(var) * z1 + D^T z2 / sqrt(K - 1))`` with
        ``var = clamp(sq_mean - mean**2, min=var_clamp)``, ``D`` the ``K = rank`` deviation rows
        in use, and ``z1 ~ N(0, I_N)``, ``z2 ~ N(0, I_K)`` drawn in that order. The sample's
        covariance is ``scale * (diag(var) + D^T D / (K - 1))``. The authors' code divides by
        ``max_num_models - 1``, which equals ``K - 1`` once the ring is full. ``diag_only`` drops
        the low-rank term, and so does ``K < 2``: ``K - 1`` is then 0, and the single row is
        zero anyway (the first model is its own mean).

        Args:
            scale: covariance scale (the paper uses 0.5).
            diag_only: sample from the diagonal part only (SWAG-diagonal).
            seed: seeds a fresh ``torch.Generator`` on the buffers' device, so equal seeds give
                equal samples; ``None`` uses torch's default generator.
        """
        if self._n_collected == 0:
            raise RuntimeError("SWAG.sample: no model collected yet; call collect() first")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"SWAG.sample: scale must be a real number, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"SWAG.sample: scale must be finite and >= 0, got {scale}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"SWAG.sample: seed must be an int or None, got {type(seed).__name__}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        mean, sq_mean = self._layout.storages[0], self._engine.flat_second_moment().storages[0]
        noise = torch.randn(mean.shape, generator=generator, device=self.device, dtype=torch.float32)
        std = torch.addcmul(sq_mean, mean, mean, value=-1.0).clamp_min_(self.var_clamp).sqrt_()
        noise.mul_(std)
        k = self.rank
        if not diag_only and k >= 2:
            z2 = torch.randn(k, generator=generator, device=self.device, dtype=torch.float32)
            noise.addmv_(self._deviations[:k].t(), z2, alpha=1.0 / math.sqrt(k - 1))
        merge_(noise, [mean, noise], [1.0, math.sqrt(scale)])
        torch._foreach_copy_(self._params, self._views(noise))

    def mean_state_dict(self) -> Dict[str, Tensor]:
        """``model.state_dict()`` with every parameter replaced by its SWA mean.

        Parameter entries are fresh tensors in the parameters' dtypes; buffers (and anything
        else in the state dict) are the model's current ones. Load it with
        ``model.load_state_dict(...)``.
        """
        mean_of = {id(p): m for p, m in zip(self._params, self._layout.views)}
        out: Dict[str, Tensor] = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if id(value) in mean_of:
                out[key] = mean_of[id(value)].to(value.dtype, copy=True)
            else:
                out[key] = value.detach()
        return out

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot (copies) of everything needed to resume: counts, moments and the ring.

        Keys: ``n_collected``, ``max_rank``, ``var_clamp``, ``names`` (parameter names in
        order), ``mean`` and ``sq_mean`` (name -> fp32 tensor), and ``deviations``, an fp32
        ``[max_rank, numel]`` tensor whose row ``j % max_rank`` holds collection ``j``'s
        deviation, the parameters concatenated in ``names`` order.
        """
        return {
            "n_collected": self._n_collected,
            "max_rank": self.max_rank,
            "var_clamp": self.var_clamp,
            "names": list(self._names),
            "mean": {n: v.clone() for n, v in self._engine.average_state_dict().items()},
            "sq_mean": {n: v.clone() for n, v in self._engine.second_moment_state_dict().items()},
            "deviations": self._layout.pack(self._deviations),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; collecting and sampling then continue exactly.

        Everything is checked before anything is written: a missing key, other parameter
        names, shapes or ``max_rank`` raise ``ValueError`` naming the first difference.
        ``var_clamp`` is restored too. Tensors may come from another device.
        """
        where = "SWAG.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(state_dict).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        n_collected, max_rank = state_dict["n_collected"], state_dict["max_rank"]
        for key, value in (("n_collected", n_collected), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{where}: {key} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{where}: {key} must be an int >= 0, got {value!r}")
        if max_rank != self.max_rank:
            raise ValueError(f"{where}: state has max_rank={max_rank} but this SWAG has max_rank={self.max_rank}")
        var_clamp = _check_var_clamp(where, state_dict["var_clamp"])
        if not isinstance(state_dict["names"], (list, tuple)):
            raise TypeError(f"{where}: names must be a list of parameter names")
        names = list(state_dict["names"])
        if names != self._names:
            theirs, ours = set(names), set(self._names)
            extra = [n for n in names if n not in ours]
            absent = [n for n in self._names if n not in theirs]
            if extra or absent:
                raise ValueError(f"{where}: parameter names differ: unexpected {extra[:3]}, missing {absent[:3]}")
            raise ValueError(f"{where}: parameter order differs from the model's: {names[:5]} vs {self._names[:5]}")
        for key in ("mean", "sq_mean"):
            moments = state_dict[key]
            if not isinstance(moments, Mapping):
                raise TypeError(f"{where}: {key} must map names to tensors, got {type(moments).__name__}")
            for name, shape in zip(self._names, (v.shape for v in self._layout.views)):
                value = moments.get(name)
                if value is None:
                    raise ValueError(f"{where}: {key}[{name!r}] is missing")
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise TypeError(f"{where}: {key}[{name!r}] is not a floating-point tensor")
                if value.shape != shape:
                    raise ValueError(f"{where}: {key}[{name!r}] has shape {tuple(value.shape)} but the "
                                     f"parameter has shape {tuple(shape)}")
        deviations = state_dict["deviations"]
        numel = self._layout.numel()
        if not isinstance(deviations, Tensor) or not deviations.is_floating_point():
            raise TypeError(f"{where}: deviations must be a floating-point tensor")
        if tuple(deviations.shape) != (self.max_rank, numel):
            raise ValueError(f"{where}: deviations has shape {tuple(deviations.shape)}, expected "
                             f"({self.max_rank}, {numel})")

        self._engine.load_average(state_dict["mean"])
        self._engine.load_second_moment(state_dict["sq_mean"])
        self._layout.unpack_(self._deviations, deviations.to(self._deviations.device, torch.float32))
        self._engine.set_counters([int(n_collected)], [int(n_collected)])
        self.var_clamp = var_clamp

    def __repr__(self) -> str:
        return (f"SWAG({len(self._params)} tensors, {self._layout.numel()} elements on {self.device}, "
                f"n_collected={self._n_collected}, rank={self.rank}/{self.max_rank})")


def _check_var_clamp(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: var_clamp must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: var_clamp must be finite and >= 0, got {value}")
    return float(value)
