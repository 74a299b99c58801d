"""WeightAverager: an EMA or SWA of a model's weights in flat buffers, without deep-copying the module.

The average lives in one :class:`~swm_fused.FlatBuffer` per device and each
``update()`` is one fused ``ema_``/``swa_`` call per device, so a bf16 model with
an fp32 average costs 4 bytes per parameter and no parameter-sized temporaries.
Parameters are paired by name, which is why parametrized and weight-norm modules
(that ``copy.deepcopy`` based averagers choke on) work: the averager averages
exactly what ``named_parameters()`` yields.

Example::

    averager = WeightAverager(model, mode="ema", decay=0.999, warmup=EMAWarmup())
    for batch in loader:
        loss(model, batch).backward()
        optimizer.step()
        averager.update()
    with averager.swapped():          # the model now holds the average
        evaluate(model)

Sharded models (FSDP2 ``fully_shard``, DTensor parameters): each rank averages
its own shards, with no communication in ``update()``; ``swapped()`` and
``copy_to`` write the shards; ``state_dict()`` holds the average as DTensors laid
out like the parameters, so ``torch.distributed.checkpoint`` saves it and
reshards it on load. Replicated (DDP) models need nothing special: each rank
averages its replica.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .distributed import fsdp_modules, local_shard, reshard_fsdp
from .engine import AveragingEngine, check_meshes, named_tensors, part_for

ModelLike = Union[nn.Module, Mapping[str, Tensor]]

_MODES = ("ema", "swa")
_STATE_KEYS = ("mode", "step", "n_updates", "n_averaged", "skipped", "average")


@dataclasses.dataclass(frozen=True)
class EMAWarmup:
    """EMA decay warmup of timm's ``ModelEmaV3`` (``use_warmup=True``), by step number ``n``.

    With ``k = n - update_after_step - 1``: the decay is 0 (the update copies the
    weights) while ``k <= 0``, then ``1 - (1 + k / warmup_gamma) ** -warmup_power``,
    clamped to ``[min_decay, decay]``. ``warmup_gamma=1, warmup_power=2/3`` reaches
    0.999 at about 31.6K steps and 0.9999 at 1M; ``warmup_power=3/4`` suits shorter runs.

    Pass it as ``WeightAverager(..., warmup=EMAWarmup(...))`` or as a dict of these fields.
    """

    update_after_step: int = 0
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        # the package's rule: a wrong type is a TypeError, a wrong value of the right type a ValueError
        if isinstance(self.update_after_step, bool) or not isinstance(self.update_after_step, numbers.Integral):
            raise TypeError(f"EMAWarmup: update_after_step must be an int, got {type(self.update_after_step).__name__}")
        if self.update_after_step < 0:
            raise ValueError(f"EMAWarmup: update_after_step must be an int >= 0, got {self.update_after_step!r}")
        for name in ("warmup_gamma", "warmup_power", "min_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"EMAWarmup: {name} must be a number, got {type(value).__name__}")
        for name in ("warmup_gamma", "warmup_power"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"EMAWarmup: {name} must be a number > 0, got {value!r}")
        if not 0.0 <= self.min_decay <= 1.0:
            raise ValueError(f"EMAWarmup: min_decay must be in [0, 1], got {self.min_decay!r}")

    @classmethod
    def coerce(cls, warmup: Union["EMAWarmup", Mapping[str, Any], bool, None], what: str) -> Optional["EMAWarmup"]:
        """``warmup`` as the front-ends accept it: an EMAWarmup, a dict of its fields, ``True`` (the
        defaults), ``False`` or None (no warmup). Anything else is a TypeError naming ``what``."""
        if warmup is True:
            return cls()
        if warmup is None or warmup is False:
            return None
        if isinstance(warmup, Mapping):
            return cls(**warmup)
        if not isinstance(warmup, cls):
            raise TypeError(f"{what}: warmup must be an EMAWarmup, a dict of its fields, a bool or None, "
                            f"got {type(warmup).__name__}")
        return warmup

    def decay_at(self, step: int, decay: float) -> float:
        """The decay for update number ``step`` (1-based) when the target decay is ``decay``."""
        return self.schedule(step, decay)[0]

    def schedule(self, step: int, decay: float) -> Tuple[float, bool]:
        """``(decay_at(step, decay), final)``: ``final`` when every later step gives the same decay (the
        warmup curve, which only grows, is past ``decay`` by more than pow's rounding can undo)."""
        # timm/utils/model_ema.py, ModelEmaV3.get_decay(step) with use_warmup=True:
        #   step = max(0, step - self.update_after_step - 1); if step <= 0: return 0.0
        #   decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        #   decay = max(min(decay, self.decay), self.min_decay)
        k = max(0, step - self.update_after_step - 1)
        if k <= 0:
            return 0.0, False
        warm = 1 - (1 + k / self.warmup_gamma) ** -self.warmup_power
        return max(min(warm, decay), self.min_decay), warm - decay > 1e-12


class WeightAverager:
    """EMA or SWA of a model's parameters (and optionally buffers) in flat buffers.

    Args:
        model: the module whose ``named_parameters()`` (plus ``named_buffers()`` when
            ``include_buffers``) are averaged, or a mapping name -> tensor. The
            averager keeps references to those tensors and reads them on every
            ``update()``; it never copies the module.
        mode: ``"ema"`` (exponential moving average) or ``"swa"`` (equal-weight mean).
        decay: EMA decay in [0, 1] (the target decay when ``warmup`` is given).
        dtype: the average's dtype (default float32, e.g. for a bf16 model); ``None``
            keeps float64 tensors in float64 and averages the rest in float32.
        device: where the average lives; ``None`` keeps it next to each tensor.
            ``"cpu"`` offloads it: tensors on a GPU are copied out through pinned
            memory and the update runs with the CPU backend.
        start, every: ``update()`` number ``n`` (1-based) is applied when
            ``n > start`` and ``(n - start) % every == 0``; other calls only count.
        warmup: an :class:`EMAWarmup`, a dict of its fields, or ``True`` for its defaults: the decay of update
            ``n`` follows timm ``ModelEmaV3.get_decay(n)`` with ``use_warmup=True``.
            EMA mode only.
        include_buffers: also average floating buffers (integer buffers keep their
            latest value), as ``AveragedModel(use_buffers=True)`` does.
        skip_nonfinite: an update whose tensors hold NaN/Inf leaves the average
            untouched and counts in :attr:`skipped`; checked on the device, no host sync.
            With sharded parameters each rank checks only its own shards (no communication).

    The first applied update copies the weights in both modes (``AveragedModel``,
    torchcontrib SWA and ``ModelEmaV3.update(model, step=n)`` all do). Until then the
    average holds the weights seen at construction; so does an EMA whose first applied
    update was skipped as non-finite (later updates blend into those weights).
    """

    def __init__(self, model: ModelLike, *, mode: str = "ema", decay: float = 0.9999,
                 dtype: Optional[torch.dtype] = torch.float32,
                 device: Optional[Union[str, torch.device]] = None, start: int = 0, every: int = 1,
                 warmup: Optional[Union[EMAWarmup, Mapping[str, Any], bool]] = None,
                 include_buffers: bool = False, skip_nonfinite: bool = True):
        if mode not in _MODES:
            raise ValueError(f"WeightAverager: mode must be 'ema' or 'swa', got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f"WeightAverager: decay must be a number, got {type(decay).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"WeightAverager: decay must be a number in [0, 1], got {decay!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"WeightAverager: dtype must be float32, float64, bfloat16, float16 or None, got {dtype}")
        for name, value, low in (("start", start, 0), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"WeightAverager: {name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"WeightAverager: {name} must be >= {low}, got {value}")
        warmup = EMAWarmup.coerce(warmup, "WeightAverager")
        if warmup is not None and mode != "ema":
            raise ValueError("WeightAverager: warmup only applies to mode='ema'")
        if not isinstance(model, (nn.Module, Mapping)):
            raise TypeError(f"WeightAverager: model must be an nn.Module or a mapping of name -> Tensor, "
                            f"got {type(model).__name__}")
        self.mode = mode
        self.decay = float(decay)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.start = int(start)
        self.every = int(every)
        self.warmup: Optional[EMAWarmup] = warmup
        self.include_buffers = include_buffers
        self.engine = AveragingEngine(model, dtype=dtype, device=device, include_buffers=include_buffers,
                                      skip_nonfinite=skip_nonfinite, what="WeightAverager")
        self._step = 0
        self._warm_done: Optional[Tuple[int, EMAWarmup, float, float]] = None  # see _decay

    @property
    def skip_nonfinite(self) -> bool:
        """Whether updates whose tensors hold NaN/Inf are skipped (settable)."""
        return self.engine.skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        self.engine.skip_nonfinite = bool(value)

    # ----------------------------------------------------------------- updating
    def update(self) -> bool:
        """Count one step and, when ``start``/``every`` say so, average the current weights in.

        One fused ``ema_``/``swa_`` call per device. Returns whether this step was an
        averaging step (a non-finite step still returns True; see :attr:`skipped`).

        Host cost: on one device, once the first update has bound the step in C++, an update is
        the schedule, O(1) staleness checks and one C call (``AveragingEngine.fast_update``).
        """
        engine = self.engine
        if engine.is_swapped:
            raise RuntimeError("WeightAverager.update: the average is swapped into the model; "
                               "leave swapped() first")
        step = self._step = self._step + 1
        if step <= self.start or (step - self.start) % self.every:
            return False
        mode = self.mode
        if mode == "ema":
            decay = 0.0 if engine.attempts[0] == 0 else self._decay(step)
            if not engine.fast_update("ema", decay):
                engine.update("ema", decay=decay)
        elif not engine.fast_update(mode):
            engine.update(mode)
        return True

    def _decay(self, step: int) -> float:
        """``decay_at(step)``, without the warmup formula once it has reached its final value."""
        warmup = self.warmup
        if warmup is None:
            return self.decay
        done = self._warm_done
        if done is not None and step >= done[0] and done[1] is warmup and done[2] == self.decay:
            return done[3]
        value, final = warmup.schedule(step, self.decay)
        if final:  # every later step gives this value
            self._warm_done = (step, warmup, self.decay, value)
        return value

    def decay_at(self, step: int) -> float:
        """The EMA decay of an update at step number ``step`` (1-based), the first update's copy aside."""
        if self.warmup is None:
            return self.decay
        return self.warmup.decay_at(step, self.decay)

    # ------------------------------------------------------------ using the average
    @property
    def is_swapped(self) -> bool:
        """Whether the average is currently swapped into the model."""
        return self.engine.is_swapped

    def swap_in(self) -> None:
        """Save the training weights, then write the average (cast to the model's dtypes) into the model.

        Prefer :meth:`swapped`; :meth:`swap_out` restores the training weights bit for bit."""
        if self.engine.is_swapped:
            raise RuntimeError("WeightAverager: the average is already swapped into the model")
        self.engine.swap_in()

    def swap_out(self) -> None:
        """Restore the training weights saved by :meth:`swap_in`, bit for bit."""
        if not self.engine.is_swapped:
            raise RuntimeError("WeightAverager: the average is not swapped into the model")
        self.engine.swap_out()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the average (in the model's dtype).

        On exit, exceptions included, the training weights are restored exactly.
        Costs one copy of the swapped tensors (in the model's dtype) while inside.
        """
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    @torch.no_grad()
    def copy_to(self, model: ModelLike) -> None:
        """Write the average into ``model`` (paired by name, cast to its dtypes).

        ``model`` must have exactly the averaged names with the same shapes;
        otherwise ValueError, and nothing is written. Sharded tensors are written
        shard to shard; a plain tensor that receives a sharded average gathers it
        (a collective: call ``copy_to`` on every rank).
        """
        reshard_fsdp(fsdp_modules(model))
        targets = dict(named_tensors(model, self.include_buffers, "copy_to: model"))
        self.engine.check_names_and_shapes("copy_to", {n: t.shape for n, t in targets.items()})
        average = self.average_state_dict()
        check_meshes("copy_to", {name: (average[name], targets[name]) for name in average})
        for name, tensor in average.items():
            local_shard(targets[name]).copy_(part_for(tensor, targets[name]))

    def average_state_dict(self) -> Dict[str, Tensor]:
        """Name -> averaged tensor, in the average's dtype and device (views into the live average).

        Holds the parameters, plus the buffers when ``include_buffers`` (integer
        buffers: their latest value). Clone the tensors to keep a snapshot. For a
        sharded (DTensor) model tensor the entry is a DTensor with the parameter's
        mesh, placements and global shape, wrapping this rank's part of the average.
        """
        return self.engine.average_state_dict()

    # ------------------------------------------------------------------ counters
    @property
    def names(self) -> List[str]:
        """Names of the averaged tensors, in the model's order."""
        return self.engine.names

    @property
    def step(self) -> int:
        """Number of ``update()`` calls so far (gated and skipped ones included)."""
        return self._step

    @property
    def n_averaged(self) -> int:
        """Number of updates averaged in (reads a device counter: syncs with the device)."""
        return self.engine.counters()[0]

    @property
    def skipped(self) -> int:
        """Number of updates skipped for NaN/Inf (reads a device counter: syncs with the device)."""
        return self.engine.counters()[1]

    @property
    def nbytes(self) -> int:
        """Bytes this averager holds: the average (padding included), plus any offload staging buffer."""
        return self.engine.nbytes

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: counters and the average.

        ``"average"`` holds views into the live average (as ``nn.Module.state_dict`` does);
        for sharded models they are DTensors, so ``torch.distributed.checkpoint`` can
        save it and load it in place on any world size, e.g.::

            dcp.save({"averager": averager.state_dict()}, checkpoint_id=path)
            state = {"averager": averager.state_dict()}
            dcp.load(state, checkpoint_id=path)
            averager.load_state_dict(state["averager"])
        """
        return {
            "mode": self.mode,
            "step": self._step,
            "n_updates": self.engine.attempts[0],
            "n_averaged": self.engine.count(0).clone(),
            "skipped": self.engine.skipped.clone(),
            "average": self.average_state_dict(),
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError/TypeError if ``state`` cannot be loaded; touches nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: expected a mapping, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"load_state_dict: missing keys {missing}")
        if state["mode"] != self.mode:
            raise ValueError(f"load_state_dict: the state is for mode {state['mode']!r}, this averager "
                             f"is {self.mode!r}")
        for key in ("step", "n_updates"):
            if isinstance(state[key], bool) or not isinstance(state[key], numbers.Integral):
                raise TypeError(f"load_state_dict: {key} must be an int, got {type(state[key]).__name__}")
            if state[key] < 0:
                raise ValueError(f"load_state_dict: {key} must be an int >= 0, got {state[key]!r}")
        for key in ("n_averaged", "skipped"):
            if not isinstance(state[key], (Tensor, numbers.Integral)):
                raise TypeError(f"load_state_dict: {key} must be a Tensor or an int, got {type(state[key]).__name__}")
        self.engine.check_average("load_state_dict", state["average"])

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Validates everything first: on error nothing changes.

        Averages may be full tensors or DTensors (as ``torch.distributed.checkpoint``
        loads them); each rank copies in the part it holds.
        """
        if self.engine.is_swapped:
            raise RuntimeError("load_state_dict: the average is swapped into the model; leave swapped() first")
        self.check_state_dict(state)
        self.engine.load_average(state["average"])
        self._step = int(state["step"])
        self.engine.set_counters([state["n_averaged"]], [int(state["n_updates"])], state["skipped"])

    def __repr__(self) -> str:
        where = ", ".join(str(d) for d in self.engine.devices)
        return (f"WeightAverager(mode={self.mode!r}, {len(self.names)} tensors, {self.engine.numel()} elements on "
                f"{where}, step={self._step})")
