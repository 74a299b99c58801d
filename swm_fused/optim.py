"""Optimizer wrappers that keep a weight average next to any torch optimizer: SWA and EMA.

Both are :class:`torch.optim.Optimizer` subclasses that delegate ``param_groups``,
``defaults``, ``zero_grad`` and ``add_param_group`` to the wrapped optimizer, so LR
schedulers (``SWALR`` included) and ``torch.amp.GradScaler`` work on them: a step the
scaler skips for inf/NaN gradients skips the average too. Each wrapper keeps all its
param groups in one :class:`~swm_fused.engine.AveragingEngine` (one flat buffer per
device, the groups as segments), so an update is one fused call and one NaN/Inf check
whatever the number of groups (float32 averages for low-precision params, float64 for
float64 ones).

:class:`SWA` follows ``torchcontrib.optim.SWA``: ``state[p]["swa_buffer"]``,
``param_groups[i]["n_avg"]`` / ``["step_counter"]``, a ``state_dict()`` with keys
``opt_state`` / ``swa_state`` / ``param_groups``, automatic and manual mode, ``swa_lr``,
float ``swa_start`` / ``swa_freq`` cast with a warning. The deliberate differences are
listed in README.md.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .averager import EMAWarmup
from .engine import AveragingEngine

__all__ = ["SWA", "EMA"]

_LEGACY_AVERAGER_KEYS = ("mode", "step", "n_updates", "n_averaged", "skipped", "average")


class _AveragingOptimizer(Optimizer):
    """Delegates the optimizer interface to ``self.optimizer`` and keeps one engine for all param groups.

    ``Optimizer.__init__`` is deliberately not called: the param groups and state
    are the wrapped optimizer's own objects, not copies.
    """

    _mode = "ema"

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        named, segments = [], []
        for g, group in enumerate(optimizer.param_groups):
            named += [(f"{g}.{i}", p) for i, p in enumerate(group["params"])]
            segments += [g] * len(group["params"])
        self.engine = AveragingEngine(named, dtype=None, segments=segments, what=type(self).__name__)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        g = len(self.optimizer.param_groups) - 1
        params = self.optimizer.param_groups[g]["params"]
        self.engine = self.engine.extend([(f"{g}.{i}", p) for i, p in enumerate(params)], g)

    def _check_not_swapped(self, what: str) -> None:
        if self.engine.is_swapped:
            raise RuntimeError(f"{type(self).__name__}.{what}: the averages are swapped into the model; "
                               "swap them back first")

    def _inner_step(self, closure: Optional[Callable[[], float]]) -> Optional[float]:
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def _applied_groups(self) -> List[int]:
        return [g for g in range(len(self.param_groups)) if self.engine.attempts[g] > 0]

    def average_state_dict(self) -> Dict[str, Tensor]:
        """The averages keyed ``"<group index>.<param index in group>"``, in the averages' dtype (views).

        Groups without an average yet are left out.
        """
        return self.engine.average_state_dict(self._applied_groups())

    # ---- the 0.1.0 checkpoint layout: {"optimizer": ..., "averages": [WeightAverager state or None per group]}
    def _legacy_group_states(self) -> List[Optional[Dict[str, Any]]]:
        out: List[Optional[Dict[str, Any]]] = []
        for g in range(len(self.param_groups)):
            if self.engine.attempts[g] == 0 and self._mode == "swa":
                out.append(None)
                continue
            average = {name.split(".", 1)[1]: t for name, t in self.engine.average_state_dict([g]).items()}
            out.append({"mode": self._mode, "step": self._group_step(g), "n_updates": self.engine.attempts[g],
                        "n_averaged": self.engine.count(g).clone(), "skipped": self.engine.skipped.clone(),
                        "average": average})
        return out

    def _group_step(self, g: int) -> int:
        raise NotImplementedError

    def _set_group_step(self, g: int, step: int) -> None:
        raise NotImplementedError

    def _check_legacy(self, state_dict: Mapping[str, Any]) -> List[Optional[Mapping[str, Any]]]:
        averages = state_dict["averages"]
        if not isinstance(averages, (list, tuple)) or len(averages) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: 'averages' must hold one entry per param "
                             f"group ({len(self.param_groups)}), got "
                             f"{len(averages) if isinstance(averages, (list, tuple)) else type(averages).__name__}")
        for g, state in enumerate(averages):
            if state is None:
                continue
            try:
                if not isinstance(state, Mapping):
                    raise TypeError(f"expected a mapping, got {type(state).__name__}")
                missing = [k for k in _LEGACY_AVERAGER_KEYS if k not in state]
                if missing:
                    raise ValueError(f"missing keys {missing}")
                if state["mode"] != self._mode:
                    raise ValueError(f"the state is for mode {state['mode']!r}, not {self._mode!r}")
                for key in ("step", "n_updates"):
                    if isinstance(state[key], bool) or not isinstance(state[key], numbers.Integral):
                        raise TypeError(f"{key} must be an int, got {type(state[key]).__name__}")
                    if state[key] < 0:
                        raise ValueError(f"{key} must be an int >= 0, got {state[key]!r}")
                average = state["average"]
                if not isinstance(average, Mapping):
                    raise TypeError(f"'average' must be a mapping, got {type(average).__name__}")
                self.engine.check_average("load_state_dict", {f"{g}.{k}": v for k, v in average.items()}, [g])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{type(self).__name__}.load_state_dict: param group {g}: {exc}") from None
        return list(averages)

    def _load_legacy(self, averages: Sequence[Optional[Mapping[str, Any]]]) -> None:
        counts, attempts, skipped = [], [], 0
        for g, state in enumerate(averages):
            if state is None:
                counts.append(0)
                attempts.append(0)
                self._set_group_step(g, self._group_step(g))
                continue
            self.engine.load_average({f"{g}.{k}": v for k, v in state["average"].items()}, [g])
            counts.append(state["n_averaged"])
            attempts.append(int(state["n_updates"]))
            skipped = max(skipped, int(torch.as_tensor(state["skipped"])))
            self._set_group_step(g, int(state["step"]))
        self.engine.set_counters(counts, attempts, skipped)

    # Optimizer's own pickling rebuilds param_groups/state as attributes; here they belong to self.optimizer.
    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


def _cast_schedule(name: str, value: Any) -> Optional[int]:
    """torchcontrib's rule: a non-int swa_start / swa_freq is cast with int() and a warning."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SWA: {name} must be an int or None, got {type(value).__name__}")
    if not isinstance(value, numbers.Integral):
        warnings.warn("Casting swa_start, swa_freq to int")
        return int(value)
    return int(value)


class SWA(_AveragingOptimizer):
    """Stochastic Weight Averaging around any optimizer, compatible with ``torchcontrib.optim.SWA``.

    - Automatic mode (``swa_start`` and ``swa_freq`` given): each ``step()`` counts
      in ``group["step_counter"]``; after step ``s`` the group is averaged in when
      ``s > swa_start`` and ``s % swa_freq == 0``. With ``swa_lr``, every step taken
      once ``step_counter >= swa_start`` runs at ``lr = swa_lr``.
    - Manual mode (otherwise): call :meth:`update_swa` (or :meth:`update_swa_group`).
    - :meth:`swap_swa_sgd` swaps the weights and their averages; calling it again
      swaps back, restoring the weights exactly. :meth:`bn_update` recomputes
      BatchNorm statistics for the averaged weights.

    ``state[p]["swa_buffer"]`` is the average of ``p`` (a view into the flat storage;
    float32 for low-precision params) once its group has been averaged, and
    ``param_groups[i]["n_avg"]`` counts the models averaged into group ``i`` (a 0-dim
    int64 tensor on the params' device, so counting needs no host sync). Updates whose
    weights hold NaN/Inf are skipped and not counted.
    """

    _mode = "swa"

    def __init__(self, optimizer: Optimizer, swa_start: Optional[int] = None, swa_freq: Optional[int] = None,
                 swa_lr: Optional[float] = None):
        super().__init__(optimizer)
        swa_start, swa_freq = _cast_schedule("swa_start", swa_start), _cast_schedule("swa_freq", swa_freq)
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
        if swa_lr is not None and (isinstance(swa_lr, bool) or not isinstance(swa_lr, numbers.Real)):
            raise TypeError(f"SWA: swa_lr must be a number or None, got {type(swa_lr).__name__}")
        if swa_lr is not None and swa_lr < 0:
            raise ValueError(f"SWA: invalid swa_lr {swa_lr!r}; it must be a number >= 0")
        self.swa_start = swa_start
        self.swa_freq = swa_freq
        self.swa_lr = swa_lr
        for g, group in enumerate(self.param_groups):
            group["step_counter"] = 0
            group["n_avg"] = self.engine.count(g)

    @property
    def state(self) -> Dict[Any, Dict[str, Tensor]]:  # type: ignore[override]
        """``state[p]["swa_buffer"]``: the average of ``p`` for every param whose group has been averaged
        (torchcontrib's layout). The wrapped optimizer's own state is :attr:`opt_state`."""
        out: Dict[Any, Dict[str, Tensor]] = defaultdict(dict)
        views = self.engine.views()
        index = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if self.engine.attempts[g] > 0:
                    out[p]["swa_buffer"] = views[index]
                index += 1
        return out

    @property
    def opt_state(self) -> Dict[Any, Any]:
        """The wrapped optimizer's state (torchcontrib's ``opt_state``)."""
        return self.optimizer.state

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its SWA counters start at 0."""
        param_group["step_counter"] = 0
        super().add_param_group(param_group)
        self._refresh_counts()

    def _refresh_counts(self) -> None:
        for g, group in enumerate(self.param_groups):
            group["n_avg"] = self.engine.count(g)

    def _group_step(self, g: int) -> int:
        return int(self.param_groups[g].get("step_counter", 0))

    def _set_group_step(self, g: int, step: int) -> None:
        self.param_groups[g]["step_counter"] = step

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
        due = []
        for index, group in enumerate(self.param_groups):
            group["step_counter"] += 1
            steps = group["step_counter"]
            if self._auto_mode and steps > self.swa_start and steps % self.swa_freq == 0:
                due.append(index)
        if due:
            self.engine.update("swa", segments=due)
        return loss

    def update_swa(self) -> None:
        """Average the current weights of every param group in (one fused call)."""
        self._check_not_swapped("update_swa")
        self.engine.update("swa")

    def update_swa_group(self, group: Dict[str, Any]) -> None:
        """Average the current weights of one param group (one of ``param_groups``) in."""
        self._check_not_swapped("update_swa_group")
        for index, candidate in enumerate(self.param_groups):
            if candidate is group:
                self.engine.update("swa", segments=[index])
                return
        raise ValueError("SWA.update_swa_group: group is not one of this optimizer's param_groups")

    def swap_swa_sgd(self) -> None:
        """Swap the weights and their SWA averages (again to swap back, exactly).

        Groups without an average yet are left as they are, with a warning.
        """
        if self.engine.is_swapped:
            self.engine.swap_out()
            return
        applied = self._applied_groups()
        for index in range(len(self.param_groups)):
            if index not in applied:
                warnings.warn(f"SWA wasn't applied to param group {index}; skipping it")
        if applied:
            self.engine.swap_in(applied)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """torchcontrib's layout: ``opt_state`` (the wrapped optimizer's state), ``swa_state``
        (param index -> ``{"swa_buffer": average}``, for averaged groups; views) and ``param_groups``
        (the wrapped optimizer's, with ``n_avg`` and ``step_counter``)."""
        inner = self.optimizer.state_dict()
        swa_state: Dict[int, Dict[str, Tensor]] = {}
        views = self.engine.views()
        applied = set(self._applied_groups())
        for i, name in enumerate(self.engine.names):
            if int(name.split(".", 1)[0]) in applied:
                swa_state[i] = {"swa_buffer": views[i]}
        return {"opt_state": inner["state"], "swa_state": swa_state, "param_groups": inner["param_groups"]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output, a ``torchcontrib.optim.SWA`` state dict, or a swm_fused 0.1.0
        one (``{"optimizer", "averages"}``). Everything is checked before anything is loaded."""
        self._check_not_swapped("load_state_dict")
        name = "SWA.load_state_dict"
        if isinstance(state_dict, Mapping) and "optimizer" in state_dict and "averages" in state_dict:
            averages = self._check_legacy(state_dict)
            self.optimizer.load_state_dict(state_dict["optimizer"])
            self._refresh_counts()
            self._load_legacy(averages)
            self._refresh_counts()
            return
        if not isinstance(state_dict, Mapping) or not all(k in state_dict for k in ("opt_state", "swa_state",
                                                                                    "param_groups")):
            raise ValueError(f"{name}: expected a dict with keys 'opt_state', 'swa_state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            raise ValueError(f"{name}: the state has {len(groups) if isinstance(groups, (list, tuple)) else '?'} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        buffers = self._match_swa_state(name, state_dict["swa_state"], groups)
        self.optimizer.load_state_dict({"state": state_dict["opt_state"], "param_groups": list(groups)})
        counts, attempts = [], []
        for g, group in enumerate(self.param_groups):
            n_avg = group.get("n_avg", 0)
            counts.append(n_avg)
            attempts.append(int(torch.as_tensor(n_avg)) if g in buffers else 0)
            group.setdefault("step_counter", 0)
        for g, named in buffers.items():
            self.engine.load_average(named, [g])
        self.engine.set_counters(counts, attempts)
        self._refresh_counts()

    def _match_swa_state(self, name: str, swa_state: Any, groups: Sequence[Mapping[str, Any]]
                         ) -> Dict[int, Dict[str, Tensor]]:
        """group index -> {engine name: buffer}. Keys are param indices (this class, torch >= 1.? optimizers)
        or ``id(p)`` values (torchcontrib), matched through ``param_groups`` or, failing that, by order."""
        if not isinstance(swa_state, Mapping):
            raise TypeError(f"{name}: swa_state must be a mapping, got {type(swa_state).__name__}")
        saved_ids = [(g, i, pid) for g, group in enumerate(groups) for i, pid in enumerate(group["params"])]
        position = {pid: (g, i) for g, i, pid in saved_ids}
        for g, group in enumerate(groups):
            if len(group["params"]) != len(self.param_groups[g]["params"]):
                raise ValueError(f"{name}: param group {g} has {len(group['params'])} params in the state, "
                                 f"{len(self.param_groups[g]['params'])} here")
        keys = list(swa_state)
        if all(k in position for k in keys):
            located = [(position[k], swa_state[k]) for k in keys]
        else:  # torchcontrib keyed by id(p) with index-keyed param_groups: ids follow the update order
            order = [(g, i) for g, i, _ in saved_ids
                     if int(torch.as_tensor(groups[g].get("n_avg", 0))) > 0]
            if len(order) != len(keys):
                raise ValueError(f"{name}: cannot match {len(keys)} swa_state entries to the "
                                 f"{len(order)} params of averaged groups")
            located = list(zip(order, (swa_state[k] for k in keys)))
        out: Dict[int, Dict[str, Tensor]] = {}
        for (g, i), entry in located:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("swa_buffer"), Tensor):
                raise ValueError(f"{name}: swa_state entry of param {i} of group {g} has no 'swa_buffer' tensor")
            out.setdefault(g, {})[f"{g}.{i}"] = entry["swa_buffer"]
        for g, named in out.items():
            try:
                self.engine.check_average(name, named, [g])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}: param group {g}: {exc}") from None
        return out

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
    :class:`~swm_fused.WeightAverager`, and may be changed at any time (the next
    ``step()`` uses the new values; invalid values raise). Each group counts its own
    steps (:attr:`steps`): the number of ``step()`` calls that ran since it was added
    (steps a GradScaler skips do not count). The first update of a group copies its
    weights. Use :meth:`swapped` to evaluate with the average.
    """

    _mode = "ema"

    def __init__(self, optimizer: Optimizer, decay: float = 0.9999,
                 warmup: Optional[Union[EMAWarmup, Mapping[str, Any]]] = None, every: int = 1):
        super().__init__(optimizer)
        self.decay = decay
        self.warmup = warmup
        self.every = every
        self._steps = [0] * len(self.param_groups)

    @property
    def state(self) -> Dict[Any, Any]:  # type: ignore[override]
        return self.optimizer.state

    @property
    def decay(self) -> float:
        """The EMA decay (the target decay when ``warmup`` is set), in [0, 1]."""
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"EMA: decay must be a number, got {type(value).__name__}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"EMA: decay must be a number in [0, 1], got {value!r}")
        self._decay = float(value)

    @property
    def warmup(self) -> Optional[EMAWarmup]:
        """The decay warmup (an :class:`EMAWarmup`) or None; a dict is converted."""
        return self._warmup

    @warmup.setter
    def warmup(self, value: Optional[Union[EMAWarmup, Mapping[str, Any]]]) -> None:
        if isinstance(value, Mapping):
            value = EMAWarmup(**value)
        if value is not None and not isinstance(value, EMAWarmup):
            raise TypeError(f"EMA: warmup must be an EMAWarmup, a dict or None, got {type(value).__name__}")
        self._warmup = value

    @property
    def every(self) -> int:
        """A group is averaged at its steps ``n`` with ``n % every == 0``."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"EMA: every must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"EMA: every must be >= 1, got {value}")
        self._every = int(value)

    @property
    def steps(self) -> List[int]:
        """Per param group: the number of ``step()`` calls that ran since the group was added."""
        return list(self._steps)

    def decay_at(self, step: int) -> float:
        """The decay of an update at group step ``step`` (1-based), the first update's copy aside."""
        return self._decay if self._warmup is None else self._warmup.decay_at(step, self._decay)

    def _group_step(self, g: int) -> int:
        return self._steps[g]

    def _set_group_step(self, g: int, step: int) -> None:
        self._steps[g] = step

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and start its average (its step count starts at 0)."""
        super().add_param_group(param_group)
        self._steps.append(0)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One step of the wrapped optimizer, then one EMA update of every due group (one fused call)."""
        self._check_not_swapped("step")
        loss = self._inner_step(closure)
        due, decays = [], []
        for g in range(len(self.param_groups)):
            self._steps[g] += 1
            decays.append(0.0)
            if self._steps[g] % self._every == 0:
                due.append(g)
                decays[g] = 0.0 if self.engine.attempts[g] == 0 else self.decay_at(self._steps[g])
        if due:
            self.engine.update("ema", decay=decays, segments=due)
        return loss

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the params hold their EMA; the training weights come back exactly on exit."""
        with self.engine.swapped():
            yield

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict under ``"optimizer"`` and one average state per group
        under ``"averages"`` (the layout of swm_fused 0.1.0)."""
        return {"optimizer": self.optimizer.state_dict(), "averages": self._legacy_group_states()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The averages are checked before anything is loaded."""
        self._check_not_swapped("load_state_dict")
        if not isinstance(state_dict, Mapping) or "optimizer" not in state_dict or "averages" not in state_dict:
            raise ValueError("EMA.load_state_dict: expected a dict with keys 'optimizer' and 'averages'")
        averages = self._check_legacy(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._load_legacy(averages)

from .sam import SAM, sam_bn_bypass, sam_no_sync  # noqa: E402  (sharpness-aware minimisation, docs/sam.md)
__all__ += ["SAM", "sam_bn_bypass", "sam_no_sync"]
