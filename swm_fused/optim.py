"""Optimizer wrappers that keep a weight average next to any torch optimizer: SWA and EMA.

Both are :class:`torch.optim.Optimizer` subclasses that delegate ``param_groups``,
``state``, ``defaults``, ``zero_grad`` and ``add_param_group`` to the wrapped
optimizer, so LR schedulers (``SWALR`` included) and ``torch.amp.GradScaler`` work
on them: a step the scaler skips for inf/NaN gradients skips the average too.
Each param group is averaged by its own :class:`~swm_fused.WeightAverager`
(fused flat buffers; float32 for low-precision params, float64 for float64 ones).
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .averager import EMAWarmup, WeightAverager

__all__ = ["SWA", "EMA"]


class _AveragingOptimizer(Optimizer):
    """Delegates the optimizer interface to ``self.optimizer`` and keeps one averager per param group.

    ``Optimizer.__init__`` is deliberately not called: the param groups and state
    are the wrapped optimizer's own objects, not copies.
    """

    def __init__(self, optimizer: Optimizer, averager_kwargs: Dict[str, Any]):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._averager_kwargs = averager_kwargs
        self._averagers: List[Optional[WeightAverager]] = [None] * len(optimizer.param_groups)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Dict[Any, Any]:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._averagers.append(None)

    def _new_averager(self, group_index: int) -> WeightAverager:
        """An averager over the group's params (named by position), holding their current values."""
        tensors = {str(i): p for i, p in enumerate(self.param_groups[group_index]["params"])}
        return WeightAverager(tensors, dtype=None, **self._averager_kwargs)

    def _averager(self, group_index: int) -> WeightAverager:
        """The group's averager, created (holding the group's current weights) on first use."""
        averager = self._averagers[group_index]
        if averager is None:
            averager = self._new_averager(group_index)
            self._averagers[group_index] = averager
        return averager

    def _check_not_swapped(self, what: str) -> None:
        if any(a is not None and a.is_swapped for a in self._averagers):
            raise RuntimeError(f"{type(self).__name__}.{what}: the averages are swapped into the model; "
                               "swap them back first")

    def _inner_step(self, closure: Optional[Callable[[], float]]) -> Optional[float]:
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict under ``"optimizer"`` and one averager state per group
        (``None`` where a group has no average yet) under ``"averages"``."""
        return {"optimizer": self.optimizer.state_dict(),
                "averages": [a.state_dict() if a is not None else None for a in self._averagers]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The averages are checked before anything is loaded."""
        self._check_not_swapped("load_state_dict")
        if not isinstance(state_dict, Mapping) or "optimizer" not in state_dict or "averages" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with keys "
                             "'optimizer' and 'averages'")
        averages = state_dict["averages"]
        if not isinstance(averages, (list, tuple)) or len(averages) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: 'averages' must hold one entry per param "
                             f"group ({len(self.param_groups)}), got "
                             f"{len(averages) if isinstance(averages, (list, tuple)) else type(averages).__name__}")
        candidates: List[Optional[WeightAverager]] = []
        for index, state in enumerate(averages):
            averager = None
            if state is not None:
                averager = self._averagers[index]
                if averager is None:
                    averager = self._new_averager(index)
                try:
                    averager._check_state_dict(state)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"param group {index}: {exc}") from None
            candidates.append(averager)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for averager, state in zip(candidates, averages):
            if averager is not None:
                averager.load_state_dict(state)
        self._averagers = candidates

    def average_state_dict(self) -> Dict[str, Tensor]:
        """The averages keyed ``"<group index>.<param index in group>"``, in the averages' dtype (views).

        Groups without an average yet are left out.
        """
        return {f"{g}.{name}": tensor for g, averager in enumerate(self._averagers) if averager is not None
                for name, tensor in averager.average_state_dict().items()}

    # Optimizer's own pickling rebuilds param_groups/state as attributes; here they belong to self.optimizer.
    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


class SWA(_AveragingOptimizer):
    """Stochastic Weight Averaging around any optimizer, with ``torchcontrib.optim.SWA``'s semantics.

    - Automatic mode (``swa_start`` and ``swa_freq`` given): each ``step()`` counts
      in ``group["step_counter"]``; after step ``s`` the group is averaged in when
      ``s > swa_start`` and ``s % swa_freq == 0``. With ``swa_lr``, every step taken
      once ``step_counter >= swa_start`` runs at ``lr = swa_lr``.
    - Manual mode (otherwise): call :meth:`update_swa` (or :meth:`update_swa_group`).
    - :meth:`swap_swa_sgd` swaps the weights and their averages; calling it again
      swaps back, restoring the weights exactly. :meth:`bn_update` recomputes
      BatchNorm statistics for the averaged weights.

    A group's average is created at its first update. Updates whose weights hold
    NaN/Inf are skipped (per group, no host sync).
    """

    def __init__(self, optimizer: Optimizer, swa_start: Optional[int] = None, swa_freq: Optional[int] = None,
                 swa_lr: Optional[float] = None):
        super().__init__(optimizer, {"mode": "swa"})
        for name, value in (("swa_start", swa_start), ("swa_freq", swa_freq)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"SWA: {name} must be an int or None, got {type(value).__name__}")
        self._auto_mode = swa_start is not None and swa_freq is not None
        if self._auto_mode:
            if swa_start < 0:
                raise ValueError(f"SWA: invalid swa_start {swa_start}; it must be >= 0")
            if swa_freq < 1:
                raise ValueError(f"SWA: invalid swa_freq {swa_freq}; it must be >= 1")
        else:
            if swa_start is not None or swa_freq is not None:
                warnings.warn("SWA: one of swa_start, swa_freq is None; using manual mode and ignoring the other")
            if swa_lr is not None:
                warnings.warn("SWA: swa_lr is ignored in manual mode (swa_start or swa_freq is None)")
            swa_start = swa_freq = swa_lr = None
        if swa_lr is not None and (isinstance(swa_lr, bool) or not isinstance(swa_lr, numbers.Real) or swa_lr < 0):
            raise ValueError(f"SWA: invalid swa_lr {swa_lr!r}; it must be a number >= 0")
        self.swa_start = swa_start
        self.swa_freq = swa_freq
        self.swa_lr = swa_lr
        for group in self.param_groups:
            group["step_counter"] = 0

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its SWA step counter starts at 0."""
        param_group["step_counter"] = 0
        super().add_param_group(param_group)

    def _reset_lr_to_swa(self) -> None:
        if self.swa_lr is None:
            return
        for group in self.param_groups:
            if group["step_counter"] >= self.swa_start:
                group["lr"] = self.swa_lr

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One step of the wrapped optimizer; in automatic mode, then the scheduled SWA updates."""
        if self._auto_mode:
            self._check_not_swapped("step")
        self._reset_lr_to_swa()
        loss = self._inner_step(closure)
        for index, group in enumerate(self.param_groups):
            group["step_counter"] += 1
            steps = group["step_counter"]
            if self._auto_mode and steps > self.swa_start and steps % self.swa_freq == 0:
                self._averager(index).update()
        return loss

    def update_swa(self) -> None:
        """Average the current weights of every param group in."""
        self._check_not_swapped("update_swa")
        for index in range(len(self.param_groups)):
            self._averager(index).update()

    def update_swa_group(self, group: Dict[str, Any]) -> None:
        """Average the current weights of one param group (one of ``param_groups``) in."""
        self._check_not_swapped("update_swa_group")
        for index, candidate in enumerate(self.param_groups):
            if candidate is group:
                self._averager(index).update()
                return
        raise ValueError("SWA.update_swa_group: group is not one of this optimizer's param_groups")

    def swap_swa_sgd(self) -> None:
        """Swap the weights and their SWA averages (again to swap back, exactly).

        Groups without an average yet are left as they are, with a warning.
        """
        for index, averager in enumerate(self._averagers):
            if averager is None:
                warnings.warn(f"SWA wasn't applied to param group {index}; skipping it")
            elif averager.is_swapped:
                averager._swap_out()
            else:
                averager._swap_in()

    @staticmethod
    @torch.no_grad()
    def bn_update(loader: Iterable[Any], model: nn.Module, device: Optional[Union[str, torch.device]] = None) -> None:
        """Recompute BatchNorm running statistics with one pass over ``loader`` (torchcontrib's bn_update).

        Batches may be tensors or ``(input, ...)`` sequences. The statistics are the
        batch-size-weighted mean of the per-batch statistics (momentum ``b / (n + b)``);
        each BatchNorm's momentum and the model's train/eval mode are restored.
        """
        bns = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return
        momenta = {m: m.momentum for m in bns}
        was_training = model.training
        for m in bns:
            m.reset_running_stats()
        model.train()
        seen = 0
        for batch in loader:
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            size = inputs.size(0)
            for m in bns:
                m.momentum = size / float(seen + size)
            if device is not None:
                inputs = inputs.to(device)
            model(inputs)
            seen += size
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)


class EMA(_AveragingOptimizer):
    """An exponential moving average of the weights, updated after every ``step()``.

    ``decay``, ``warmup`` (an :class:`~swm_fused.averager.EMAWarmup` or dict, timm
    ``ModelEmaV3`` style) and ``every`` mean what they mean for
    :class:`~swm_fused.WeightAverager`; the step count is the number of ``step()``
    calls that ran (steps a GradScaler skips do not count). The first update copies
    the weights. Use :meth:`swapped` to evaluate with the average.
    """

    def __init__(self, optimizer: Optimizer, decay: float = 0.9999,
                 warmup: Optional[Union[EMAWarmup, Mapping[str, Any]]] = None, every: int = 1):
        super().__init__(optimizer, {"mode": "ema", "decay": decay, "warmup": warmup, "every": every})
        self.decay = decay
        self.warmup = warmup
        self.every = every
        for index in range(len(self.param_groups)):
            self._averager(index)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and start its average (its step count starts at 0)."""
        super().add_param_group(param_group)
        self._averager(len(self.param_groups) - 1)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One step of the wrapped optimizer, then one EMA update of every group."""
        self._check_not_swapped("step")
        loss = self._inner_step(closure)
        for index in range(len(self.param_groups)):
            self._averager(index).update()
        return loss

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the params hold their EMA; the training weights come back exactly on exit."""
        with contextlib.ExitStack() as stack:
            for index in range(len(self.param_groups)):
                stack.enter_context(self._averager(index).swapped())
            yield
