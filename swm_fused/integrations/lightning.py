"""Lightning callbacks on swm_fused's averaging engine: change one import.

``from lightning.pytorch.callbacks import EMAWeightAveraging`` becomes
``from swm_fused.integrations.lightning import EMAWeightAveraging``; likewise
``WeightAveraging`` and ``StochasticWeightAveraging``. The constructors take Lightning 2.6's
arguments (plus keyword-only extras), ``should_update(step_idx=None, epoch_idx=None)`` is
overridable as in Lightning, the weights are swapped in for validation and copied in at the end of
training, and checkpoints use Lightning's keys, so checkpoints move between Lightning's callbacks
and these in both directions:

- ``WeightAveraging`` / ``EMAWeightAveraging``: ``checkpoint["state_dict"]`` holds the averaged
  weights, ``checkpoint["current_model_state"]`` the training weights, and
  ``checkpoint["averaging_state"]`` ``{"n_averaged": tensor}``; the callback state
  (``checkpoint["callbacks"]["EMAWeightAveraging"]``) has Lightning's ``latest_update_step``.
- ``StochasticWeightAveraging``: Lightning's callback state (``n_averaged``, ``latest_update_epoch``,
  ``scheduler_state``, ``average_model_state``).

What these add to Lightning's:

- The average lives in the engine's flat storage and each update is one fused multi-tensor call
  per device (``EMAWeightAveraging`` included: Lightning's runs a per-tensor ``avg_fn``).
- ``dtype`` (default float32): an fp32 average of a bf16 model, with no copy of the module.
- ``skip_nonfinite`` (default True): an update whose weights hold NaN/Inf changes nothing and is
  counted in :attr:`WeightAveraging.skipped` (checked on the device).
- ``warmup`` (``EMAWeightAveraging``): timm ``ModelEmaV3``'s decay warmup, by optimizer step.
- Sharded and replicated models: FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in
  ``configure_model``) and DDP. Each rank averages its own shards (DDP: its replica) with no
  collectives and without gathering parameters; validation swaps shard by shard. Checkpoints of
  sharded models are written through ``torch.distributed.checkpoint`` (see
  :meth:`WeightAveraging.on_save_checkpoint`). ``FSDPStrategy`` (FSDP1) and DeepSpeed are refused.

Differences from Lightning's callbacks, all in what is averaged rather than how training runs:
integer buffers (BatchNorm's ``num_batches_tracked``) keep their latest value (Lightning passes them
through the averaging function, which truncates the result); with ``use_buffers=False`` the buffers
are not touched at all, so validation and the final model use the model's current BatchNorm
statistics (Lightning's use a copy taken at the last update); the average is built when fitting
starts (after ``configure_model`` and the strategy's setup) rather than by deep-copying the module in
``setup``, so it is already sharded and on the model's device (``device=None``).
"""
from __future__ import annotations

import inspect
import numbers
import os
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import check_int, require

require("lightning.pytorch", "lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.callbacks import StochasticWeightAveraging as _LightningSWA  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn  # noqa: E402

from ..averager import EMAWarmup  # noqa: E402
from ..distributed import is_dtensor, local_shard  # noqa: E402
from ..engine import AveragingEngine  # noqa: E402
from ..ops import any_nonfinite  # noqa: E402

__all__ = ["WeightAveraging", "EMAWeightAveraging", "StochasticWeightAveraging"]

DeviceLike = Optional[Union[torch.device, str, int]]
AvgFn = Callable[[Tensor, Tensor, Tensor], Tensor]
MultiAvgFn = Callable[[List[Tensor], List[Tensor], Tensor], None]
WarmupLike = Optional[Union[EMAWarmup, Mapping[str, Any], bool]]

# Where the training weights of a sharded model go in a distributed checkpoint: Lightning's
# ModelParallelStrategy writes only checkpoint["state_dict"] (and optimizer states) with
# torch.distributed.checkpoint; every other key is torch.save'd by rank 0 alone, which would keep
# only rank 0's shards.
CURRENT_KEY = "current_model_state"
SWA_AVERAGE_KEY = "swa_average_model_state"


def _check_device(what: str, device: Any) -> Optional[torch.device]:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"{what}: device must be a torch.device, str, int or None, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"{what}: device {device!r} is not a device: {error}") from None


def _check_strategy(what: str, trainer: "pl.Trainer", error: type = RuntimeError) -> None:
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise error(f"{what}: {type(trainer.strategy).__name__} is not supported (it flattens parameters its own "
                    "way); shard with FSDP2 instead: ModelParallelStrategy and fully_shard in configure_model()")


def _builtin_average(avg_fn: Optional[Callable], multi_avg_fn: Optional[Callable]) -> Optional[Tuple[str, float]]:
    """("ema", decay) or ("swa", 0.0) when the function is one of torch's or swm_fused's stock ones, which the
    engine runs fused; None for any other function (called as torch's AveragedModel calls it)."""
    fn = avg_fn if avg_fn is not None else multi_avg_fn
    if fn is None:
        return ("swa", 0.0)
    from torch.optim import swa_utils as torch_swa

    from .. import swa_utils as our_swa
    # torch's factories return closures wrapped by torch.no_grad (whose wrapper code every decorated function
    # shares): compare the unwrapped functions' code objects; the decay is in a closure cell
    inner = inspect.unwrap(fn) if callable(fn) else fn
    for factory, kind in ((torch_swa.get_ema_avg_fn, "ema"), (torch_swa.get_ema_multi_avg_fn, "ema"),
                          (torch_swa.get_swa_avg_fn, "swa"), (torch_swa.get_swa_multi_avg_fn, "swa")):
        stock = inspect.unwrap(factory(0.5) if kind == "ema" else factory())
        if getattr(inner, "__code__", None) is stock.__code__:
            if kind == "swa":
                return ("swa", 0.0)
            cells = dict(zip(inner.__code__.co_freevars, (c.cell_contents for c in inner.__closure__ or ())))
            if isinstance(cells.get("decay"), numbers.Real):
                return ("ema", float(cells["decay"]))
    for factory, kind in ((our_swa.get_ema_avg_fn, "ema"), (our_swa.get_ema_multi_avg_fn, "ema"),
                          (our_swa.get_swa_avg_fn, "swa"), (our_swa.get_swa_multi_avg_fn, "swa")):
        stock = factory(0.5) if kind == "ema" else factory()
        if type(fn) is type(stock) and (kind == "swa") == (getattr(fn, "decay", None) is None):
            return (kind, float(fn.decay) if kind == "ema" else 0.0)
    if fn is _LightningSWA.avg_fn:
        return ("swa", 0.0)
    return None


class _Average:
    """The engine over a LightningModule and everything the callbacks do with it."""

    def __init__(self, pl_module: "pl.LightningModule", *, device: Optional[torch.device], include_buffers: bool,
                 dtype: Optional[torch.dtype], skip_nonfinite: bool, what: str):
        self.module = pl_module
        self.what = what
        self.engine = AveragingEngine(pl_module, dtype=dtype, device=device, include_buffers=include_buffers,
                                      skip_nonfinite=skip_nonfinite, what=what)
        self.sharded = any(is_dtensor(t) for t in self.engine.model_tensors())

    # ------------------------------------------------------------------ updating
    def update(self, mode: str, decay: float = 0.0) -> None:
        self.engine.update(mode, decay=decay)

    @torch.no_grad()
    def update_with(self, avg_fn: Optional[AvgFn], multi_avg_fn: Optional[MultiAvgFn]) -> None:
        """A user's averaging function, called as torch's ``AveragedModel`` calls it: the first update copies,
        later ones get (average, model tensor in the average's dtype and device, n_averaged)."""
        averages = self.engine.views()
        sources = [local_shard(t).detach() for t in self.engine.model_tensors()]
        engine = self.engine
        n, skipped = engine.counters()  # the user's function reads n_averaged anyway, as torch's does
        attempts = engine.attempts[0] + 1
        if engine.skip_nonfinite and sources and bool(any_nonfinite(sources).item()):
            engine.set_counters([n], [attempts], skipped + 1)
            return
        if n == 0:
            for avg, src in zip(averages, sources):
                avg.copy_(src)
        else:
            n_on = {}
            for avg in averages:
                n_on.setdefault(avg.device, torch.tensor(n, dtype=torch.long, device=avg.device))
            cast = [src.to(device=avg.device, dtype=avg.dtype if avg.is_floating_point() else src.dtype)
                    for avg, src in zip(averages, sources)]
            if avg_fn is not None:
                for avg, src in zip(averages, cast):
                    avg.copy_(avg_fn(avg, src, n_on[avg.device]))
            else:
                groups: Dict[Tuple[torch.device, torch.dtype], Tuple[List[Tensor], List[Tensor]]] = {}
                for avg, src in zip(averages, cast):
                    a, s = groups.setdefault((avg.device, avg.dtype), ([], []))
                    a.append(avg)
                    s.append(src)
                for (device, _), (a, s) in groups.items():
                    multi_avg_fn(a, s, n_on[device])
        engine.set_counters([n + 1], [attempts], skipped)

    # ------------------------------------------------------------- using the average
    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write the average into the model (shard by shard; cast to the model's dtypes)."""
        live = [local_shard(t) for t in self.engine.model_tensors()]
        for dst, src in zip(live, self.engine.views()):
            dst.copy_(src)

    # --------------------------------------------------------------- state dicts
    def key_to_name(self) -> Dict[str, str]:
        """State-dict key -> averaged tensor's name, by tensor identity (tied weights share one average)."""
        names = self.engine.names
        by_id = {id(t): name for name, t in zip(names, self.engine.model_tensors())}
        known = set(names)
        out = {}
        for key, tensor in self.module.state_dict(keep_vars=True).items():
            name = by_id.get(id(tensor), key if key in known else None)
            if name is not None:
                out[key] = name
        return out

    def averaged_state(self, current: Mapping[str, Any]) -> Dict[str, Any]:
        """``current`` (a model state dict as the strategy wrote it) with the averaged tensors in place of the live
        ones. Sharded models: DTensors when ``current`` holds DTensors (a distributed checkpoint); otherwise full
        tensors, gathered on every rank (a collective, as the strategy's own full state dict is)."""
        averages = self.engine.average_state_dict()
        if self.sharded and not any(is_dtensor(v) for v in current.values()):
            averages = {name: (a.full_tensor().cpu() if is_dtensor(a) else a) for name, a in averages.items()}
        names = self.key_to_name()
        return {key: (averages[names[key]] if key in names else value) for key, value in current.items()}

    def check_and_load(self, state: Mapping[str, Any], counters: Optional[Tuple[int, int, int]],
                       strict: bool = True) -> None:
        """Load averaged tensors given by state-dict key (all of them when ``strict``), then the counters
        (n_averaged, update calls, skipped). Validates first: on error nothing changes."""
        names = self.key_to_name()
        persistent = set(self.module.state_dict().keys())
        live = dict(zip(self.engine.names, self.engine.model_tensors()))
        average = dict(self.engine.average_state_dict())
        missing = []
        for key, name in names.items():
            if key in state:
                average[name] = state[key]
            elif strict and key in persistent:
                missing.append(key)
        in_state_dict = set(names.values())
        for name in self.engine.names:
            if name not in in_state_dict:
                average[name] = live[name]  # non-persistent buffers: not in any checkpoint
        if missing:
            raise ValueError(f"{self.what}: the checkpoint's averaged state lacks {missing[:5]}")
        self.engine.check_average(f"{self.what}: loading the checkpoint", average)
        self.engine.load_average(average)
        if counters is not None:
            n, attempts, skipped = counters
            self.engine.set_counters([n], [attempts], skipped)


def _counter(value: Any) -> int:
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def _load_model_state(pl_module: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a (full or sharded) model state dict into a possibly sharded module."""
    if any(is_dtensor(t) for t in pl_module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full = not any(is_dtensor(v) for v in state.values())
        set_model_state_dict(pl_module, dict(state), options=StateDictOptions(full_state_dict=full))
    else:
        pl_module.load_state_dict(state)


def _dcp_load(trainer: "pl.Trainer", state: Dict[str, Any]) -> None:
    """Fill ``{"state_dict": {...}}`` in place from the distributed checkpoint being restored (every rank)."""
    import torch.distributed.checkpoint as dcp
    path = trainer.ckpt_path
    if path is None or not os.path.isdir(path):
        raise RuntimeError(f"cannot find the distributed checkpoint being restored (trainer.ckpt_path={path!r})")
    dcp.load(state, checkpoint_id=path)


class _HoldsAverage:
    """What both callbacks show of their average, ``self._average`` (built when fitting starts)."""

    _average: Optional[_Average]

    @property
    def engine(self) -> AveragingEngine:
        """The :class:`~swm_fused.AveragingEngine` holding the average (exists once fitting has started)."""
        if self._average is None:
            raise RuntimeError(f"{type(self).__name__}: the average is built when fitting starts")
        return self._average.engine

    @property
    def skipped(self) -> int:
        """Updates (epochs, for SWA) not averaged in because the weights held NaN/Inf (reads a device counter)."""
        return self.engine.counters()[1]


# ================================================================================= WeightAveraging
class WeightAveraging(_HoldsAverage, Callback):
    """Lightning's ``WeightAveraging`` on swm_fused's engine: an average of the model updated after each
    optimizer step (or epoch, see :meth:`should_update`), swapped in for validation and copied into the
    model when training ends.

    Args:
        device: where the average lives; ``None`` (default) keeps it next to each parameter (on the
            model's device once training starts). ``"cpu"`` offloads it.
        use_buffers: also average the floating buffers (BatchNorm statistics); integer buffers keep
            their latest value. Default True, as in Lightning.
        avg_fn, multi_avg_fn: as in ``torch.optim.swa_utils.AveragedModel`` (Lightning passes them
            through ``**kwargs``). None of them: equal-weight average (SWA). torch's (or
            ``swm_fused.swa_utils``') ``get_ema_avg_fn``/``get_ema_multi_avg_fn``/``get_swa_*`` run on
            the fused path; any other function is called per tensor (``avg_fn``) or per
            (device, dtype) group (``multi_avg_fn``) after the first update's copy, as torch does.
        dtype: keyword-only; the average's dtype (default float32, e.g. for a bf16 model; ``None``
            keeps float64 tensors in float64 and averages the rest in float32).
        skip_nonfinite: keyword-only; an update whose weights hold NaN/Inf leaves the average
            untouched and counts in :attr:`skipped` (default True). With sharded models each rank
            checks its own shards.
    """

    def __init__(self, device: DeviceLike = None, use_buffers: bool = True, *,
                 avg_fn: Optional[AvgFn] = None, multi_avg_fn: Optional[MultiAvgFn] = None,
                 dtype: Optional[torch.dtype] = torch.float32, skip_nonfinite: bool = True) -> None:
        what = type(self).__name__
        self._device = _check_device(what, device)
        if not isinstance(use_buffers, bool):
            raise TypeError(f"{what}: use_buffers must be a bool, got {type(use_buffers).__name__}")
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError(f"{what}: give avg_fn or multi_avg_fn, not both")
        for name, fn in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what}: {name} must be callable, got {type(fn).__name__}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"{what}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"{what}: dtype must be float32, float64, bfloat16, float16 or None, got {dtype}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"{what}: skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        self._use_buffers = use_buffers
        self._avg_fn = avg_fn
        self._multi_avg_fn = multi_avg_fn
        self._builtin = _builtin_average(avg_fn, multi_avg_fn)
        self._dtype = dtype
        self._skip_nonfinite = skip_nonfinite
        self._average: Optional[_Average] = None
        self._fitting = False
        self._pending: Optional[Tuple[Dict[str, Any], Optional[Tuple[int, int, int]], bool]] = None
        # As in Lightning: optimizer steps taken at the last update (so should_update is first asked after
        # the first optimizer step), and the epoch of the last epoch-end update (-1: none yet).
        self._latest_update_step = 0
        self._latest_update_epoch = -1

    # ---------------------------------------------------------------------- policy
    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        """Whether to update the average after optimizer step ``step_idx`` or epoch ``epoch_idx`` (0-based; one
        of them is given). Default: after every optimizer step. Override to change it, as in Lightning."""
        return step_idx is not None

    def decay_at(self, step: int) -> float:
        """The EMA decay of an update made after ``step`` optimizer steps (EMA only)."""
        if self._builtin is None or self._builtin[0] != "ema":
            raise RuntimeError(f"{type(self).__name__}: decay_at applies to an EMA")
        return self._builtin[1]

    # ------------------------------------------------------------------ properties
    @property
    def n_averaged(self) -> int:
        """Updates averaged in so far (reads a device counter)."""
        return self.engine.counters()[0]

    def average_state_dict(self) -> Dict[str, Tensor]:
        """Name -> averaged tensor (views into the live average; DTensors for sharded parameters)."""
        return self.engine.average_state_dict()

    # ----------------------------------------------------------------------- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Check the strategy when fitting begins; the average itself is built in :meth:`on_fit_start`."""
        if stage == "fit":
            _check_strategy(type(self).__name__, trainer)
            self._fitting = True
            self._average = None
            self._pending = None  # a checkpoint is restored after setup

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Build the average from the model as the strategy set it up (sharded, on its device, in its precision)."""
        self._average = _Average(pl_module, device=self._device, include_buffers=self._use_buffers,
                                 dtype=self._dtype, skip_nonfinite=self._skip_nonfinite, what=type(self).__name__)
        if self._pending is not None:
            state, counters, strict = self._pending
            self._pending = None
            self._average.check_and_load(state, counters, strict)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Update after an optimizer step when :meth:`should_update` says so (Lightning's rule)."""
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(trainer)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Update at the end of an epoch when :meth:`should_update` says so (Lightning's rule)."""
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self._update(trainer)
            self._latest_update_epoch = trainer.current_epoch

    def _update(self, trainer: "pl.Trainer") -> None:
        average = self._require_average()
        if self._builtin is None:
            average.update_with(self._avg_fn, self._multi_avg_fn)
        elif self._builtin[0] == "swa":
            average.update("swa")
        else:
            first = average.engine.attempts[0] == 0  # the first update copies, as AveragedModel's does
            average.update("ema", decay=0.0 if first else self.decay_at(trainer.global_step))

    def _require_average(self) -> _Average:
        if self._average is None:
            raise RuntimeError(f"{type(self).__name__}: the average is built when fitting starts (on_fit_start)")
        return self._average

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Swap the average into the model for validation."""
        if self._average is not None and not self._average.engine.is_swapped:
            self._average.engine.swap_in()

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Restore the training weights, bit for bit."""
        if self._average is not None and self._average.engine.is_swapped:
            self._average.engine.swap_out()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Leave the training weights in the model if validation failed half-way."""
        if self._average is not None and self._average.engine.is_swapped:
            self._average.engine.swap_out()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Copy the average into the model, as Lightning does."""
        self._require_average().copy_to_model()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Lightning's callback state (``latest_update_step``) plus ``latest_update_epoch``, ``n_updates`` (update
        calls, skipped ones included) and ``skipped``; Lightning's callback reads only its own key."""
        state: Dict[str, Any] = {"latest_update_step": self._latest_update_step,
                                 "latest_update_epoch": self._latest_update_epoch}
        if self._average is not None:
            state["n_updates"] = self._average.engine.attempts[0]
            state["skipped"] = self._average.engine.counters()[1]
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (or Lightning's callback state, which has ``latest_update_step`` only)."""
        self._latest_update_step = state_dict["latest_update_step"]
        self._latest_update_epoch = state_dict.get("latest_update_epoch", self._latest_update_epoch)
        if "n_updates" not in state_dict:
            return
        # the extras refine the counters that on_load_checkpoint set from averaging_state (called before this)
        if self._average is not None:
            engine = self._average.engine
            engine.set_counters([engine.count(0)], [int(state_dict["n_updates"])], int(state_dict["skipped"]))
        elif self._pending is not None and self._pending[1] is not None:
            state, (n, _, _), strict = self._pending
            self._pending = (state, (n, int(state_dict["n_updates"]), int(state_dict["skipped"])), strict)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Lightning's layout: the averaged weights under ``state_dict``, the training weights under
        ``current_model_state``, ``{"n_averaged": tensor}`` under ``averaging_state``.

        The averaged tensors keep the average's dtype (float32 for a bf16 model by default). For a distributed
        checkpoint of a sharded model (``ModelParallelStrategy(save_distributed_checkpoint=True)``) the training
        weights go under ``state_dict["current_model_state"]`` instead, so that ``torch.distributed.checkpoint``
        writes every rank's shards; :meth:`on_load_checkpoint` reads them from there.
        """
        if self._average is None:
            rank_zero_info(f"{type(self).__name__}: saving a checkpoint outside fitting; the average is not saved "
                           "(after fit() the model holds the average)")
            return
        engine = self._average.engine
        current = checkpoint["state_dict"]
        swapped = engine.is_swapped
        if swapped:  # saved during validation: the model holds the average; read the training weights
            engine.swap_out()
            current = {k: (v.detach().clone() if isinstance(v, Tensor) else v)
                       for k, v in trainer.strategy.lightning_module_state_dict().items()}
        try:
            averaged = self._average.averaged_state(current)
        finally:
            if swapped:
                engine.swap_in()
        checkpoint["averaging_state"] = {"n_averaged": engine.count(0).clone()}
        if any(is_dtensor(v) for v in current.values()):
            checkpoint["state_dict"] = {**averaged, CURRENT_KEY: current}
        else:
            checkpoint["state_dict"] = averaged
            checkpoint[CURRENT_KEY] = current

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Load the average and the training weights from a checkpoint written by this callback or Lightning's.

        A checkpoint without them (not written by a weight-averaging callback) starts the average from its
        ``state_dict``, as Lightning does."""
        what = type(self).__name__
        if not self._fitting:
            rank_zero_warn(f"{what}: loading a checkpoint outside fitting; the average is not restored")
            return
        averaging = checkpoint.get("averaging_state")
        if averaging is not None and CURRENT_KEY not in checkpoint and "state_dict" not in checkpoint:
            self._load_distributed(trainer, pl_module, averaging)
            return
        if averaging is None or CURRENT_KEY not in checkpoint:
            rank_zero_warn(f"{what}: the checkpoint was not written by a weight-averaging callback; the average "
                           "starts from its state_dict")
            self._load_average(dict(checkpoint["state_dict"]), None, strict=False)
            return
        rank_zero_info(f"{what}: found current_model_state in the checkpoint; it initializes the model")
        n = _counter(averaging["n_averaged"])
        if "state_dict" in checkpoint:
            self._load_average(dict(checkpoint["state_dict"]), (n, n, 0), strict=True)
        else:
            # a full checkpoint of a sharded model: ModelParallelStrategy took state_dict out and loaded it into
            # the model, so the model holds the average (in its own dtype) until the training weights go back
            average = self._require_average()
            state = {name: t.detach().clone() for name, t in
                     zip(average.engine.names, average.engine.model_tensors())}
            average.check_and_load(state, (n, n, 0), strict=True)
        _load_model_state(pl_module, checkpoint[CURRENT_KEY])

    def _load_average(self, state: Dict[str, Any], counters: Optional[Tuple[int, int, int]], strict: bool) -> None:
        if self._average is None:  # restored before on_fit_start (every strategy but ModelParallel): built there
            self._pending = (state, counters, strict)
        else:
            self._average.check_and_load(state, counters, strict)

    def _load_distributed(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                          averaging: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        average = self._require_average()
        names = average.key_to_name()
        averages = average.engine.average_state_dict()
        targets = {key: averages[name].clone() for key, name in names.items() if key == name}
        current = get_model_state_dict(pl_module)
        state = {"state_dict": {**targets, CURRENT_KEY: current}}
        _dcp_load(trainer, state)
        _load_model_state(pl_module, state["state_dict"][CURRENT_KEY])
        n = _counter(averaging["n_averaged"])
        average.check_and_load(targets, (n, n, 0))


# ============================================================================== EMAWeightAveraging
class EMAWeightAveraging(WeightAveraging):
    """Lightning's ``EMAWeightAveraging`` on the fused path, with timm-style warmup.

    Args:
        device, use_buffers: as in :class:`WeightAveraging`.
        decay: the EMA decay in [0, 1] (the target decay with ``warmup``).
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch: Lightning's
            :meth:`should_update` rule: update after optimizer step ``i`` (0-based) when
            ``i >= update_starting_at_step`` (if given) and ``i % update_every_n_steps == 0``, and at
            the end of epoch ``e`` when ``e >= update_starting_at_epoch`` (if given).
        warmup: keyword-only; an :class:`~swm_fused.EMAWarmup`, a dict of its fields (timm
            ``ModelEmaV3``'s ``update_after_step``, ``warmup_gamma``, ``warmup_power``,
            ``min_decay``) or True for its defaults. The decay of an update made after ``n``
            optimizer steps is ``EMAWarmup.decay_at(n, decay)``.
        dtype, skip_nonfinite: keyword-only, as in :class:`WeightAveraging`.
        kwargs: accepted for Lightning's signature; Lightning passes them to ``AveragedModel`` next
            to its own ``avg_fn``, so none is valid (TypeError).
    """

    def __init__(self, device: DeviceLike = None, use_buffers: bool = True, decay: float = 0.999,
                 update_every_n_steps: int = 1, update_starting_at_step: Optional[int] = None,
                 update_starting_at_epoch: Optional[int] = None, *, warmup: WarmupLike = None,
                 dtype: Optional[torch.dtype] = torch.float32, skip_nonfinite: bool = True, **kwargs: Any) -> None:
        what = type(self).__name__
        if kwargs:
            raise TypeError(f"{what}: unexpected arguments {sorted(kwargs)}; the averaging function is the EMA")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f"{what}: decay must be a number, got {type(decay).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{what}: decay must be in [0, 1], got {decay!r}")
        check_int(what, "update_every_n_steps", update_every_n_steps, 0)
        check_int(what, "update_starting_at_step", update_starting_at_step, 0, allow_none=True)
        check_int(what, "update_starting_at_epoch", update_starting_at_epoch, 0, allow_none=True)
        warmup = EMAWarmup.coerce(warmup, what)
        super().__init__(device=device, use_buffers=use_buffers, dtype=dtype, skip_nonfinite=skip_nonfinite)
        self._builtin = ("ema", float(decay))
        self.decay = float(decay)
        self.warmup: Optional[EMAWarmup] = warmup
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def decay_at(self, step: int) -> float:
        """The decay of an update made after ``step`` optimizer steps (the first update's copy aside)."""
        return self.decay if self.warmup is None else self.warmup.decay_at(step, self.decay)

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        """Lightning's ``EMAWeightAveraging.should_update``: see the class arguments."""
        if step_idx is not None:
            meets_start = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            meets_frequency = self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0
            if meets_start and meets_frequency:
                return True
        if epoch_idx is not None:
            if self.update_starting_at_epoch is not None and epoch_idx >= self.update_starting_at_epoch:
                return True
        return False


# ======================================================================= StochasticWeightAveraging
class _EngineModel:
    """Stands in for the deep copy that Lightning's ``StochasticWeightAveraging`` keeps in ``_average_model``:
    Lightning's code moves it, saves it and loads it; this callback overrides the averaging itself."""

    def __init__(self, owner: "StochasticWeightAveraging"):
        self.owner = owner

    def to(self, *args: Any, **kwargs: Any) -> "_EngineModel":
        return self  # the engine is built on the requested device

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.owner._average_model_state()

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        self.owner._load_average_model_state(state)


class StochasticWeightAveraging(_HoldsAverage, _LightningSWA):
    """Lightning's ``StochasticWeightAveraging`` with the average in swm_fused's engine.

    The learning-rate schedule (``SWALR``), the extra epoch that recomputes BatchNorm statistics and the
    callback state are Lightning's own code (this class subclasses it); only the average differs: no deep copy
    of the module, one fused ``swa_`` call per device per epoch, and sharded (FSDP2) models are supported.

    Args:
        swa_lrs, swa_epoch_start, annealing_epochs, annealing_strategy, avg_fn, device: Lightning's (``device``
            defaults to ``"cpu"``, as there: the average is offloaded). ``avg_fn=None`` runs fused; another
            function is called per parameter after the first copy, as Lightning does.
        dtype: keyword-only; the average's dtype (default float32).
        skip_nonfinite: keyword-only; an epoch whose weights hold NaN/Inf is not averaged in (default True).
    """

    def __init__(self, swa_lrs: Union[float, List[float]], swa_epoch_start: Union[int, float] = 0.8,
                 annealing_epochs: int = 10, annealing_strategy: Literal["cos", "linear"] = "cos",
                 avg_fn: Optional[AvgFn] = None, device: Optional[Union[torch.device, str]] = torch.device("cpu"), *,
                 dtype: Optional[torch.dtype] = torch.float32, skip_nonfinite: bool = True) -> None:
        super().__init__(swa_lrs=swa_lrs, swa_epoch_start=swa_epoch_start, annealing_epochs=annealing_epochs,
                         annealing_strategy=annealing_strategy, avg_fn=avg_fn, device=device)
        what = type(self).__name__
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in
                                  (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
            raise TypeError(f"{what}: dtype must be float32, float64, bfloat16, float16 or None, got {dtype}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"{what}: skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        self._user_avg_fn = avg_fn
        self._builtin = _builtin_average(avg_fn, None)
        self._dtype = dtype
        self._skip_nonfinite = skip_nonfinite
        self._average: Optional[_Average] = None
        self._pending_average: Optional[Mapping[str, Any]] = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Refuse FSDP1/DeepSpeed (Lightning's exception type); FSDP2 (ModelParallelStrategy) is supported."""
        _check_strategy(type(self).__name__, trainer, MisconfigurationException)
        self._average_model = _EngineModel(self)  # type: ignore[assignment]
        self._average = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Lightning's checks and schedule set-up, then the average, built on the model as the strategy left it."""
        super().on_fit_start(trainer, pl_module)
        device = torch.device(self._device) if self._device is not None else None
        self._average = _Average(pl_module, device=device, include_buffers=False, dtype=self._dtype,
                                 skip_nonfinite=self._skip_nonfinite, what=type(self).__name__)
        if self._pending_average is not None:
            state, self._pending_average = self._pending_average, None
            self._load_average_model_state(state)

    def update_parameters(self, average_model: Any, model: "pl.LightningModule", n_averaged: Tensor,
                          avg_fn: Any) -> None:  # type: ignore[override]
        """Average ``model``'s parameters in (one fused call per device); ``n_averaged`` follows the engine's
        count of averaged (not skipped) epochs."""
        if not isinstance(average_model, _EngineModel):
            _LightningSWA.update_parameters(average_model, model, n_averaged, avg_fn)
            return
        average = self._average
        if average is None:
            raise RuntimeError(f"{type(self).__name__}: the average is built when fitting starts")
        if self._builtin is not None:
            average.update("swa")
        else:
            average.update_with(self._user_avg_fn, None)
        n_averaged.copy_(average.engine.count(0))

    def transfer_weights(self, src_pl_module: Any, dst_pl_module: Any) -> None:  # type: ignore[override]
        """Copy the average into the model's parameters (Lightning's static method for other modules)."""
        if isinstance(src_pl_module, _EngineModel):
            if self._average is None:
                raise RuntimeError(f"{type(self).__name__}: the average is built when fitting starts")
            self._average.copy_to_model()
        else:
            _LightningSWA.transfer_weights(src_pl_module, dst_pl_module)

    def _average_model_state(self) -> Optional[Dict[str, Any]]:
        """Lightning's ``average_model_state``: the module's state dict with the averaged parameters."""
        if self._average is None:
            return None if self._pending_average is None else dict(self._pending_average)
        current = self._average.module.state_dict()
        return self._average.averaged_state(current)

    def _load_average_model_state(self, model_state: Any) -> None:
        if model_state is None:
            return
        if self._average is None:
            self._pending_average = model_state
            return
        n = _counter(self.n_averaged) if self.n_averaged is not None else int(self._init_n_averaged)
        self._average.check_and_load(model_state, (n, n, 0), strict=True)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Sharded models: the average is written by ``torch.distributed.checkpoint`` under
        ``state_dict["swa_average_model_state"]`` (distributed checkpoints), or gathered into full tensors."""
        if self._average is None or not self._average.sharded:
            return
        entry = checkpoint.get("callbacks", {}).get(self.state_key)
        if entry is None or entry.get("average_model_state") is None:
            return
        if any(is_dtensor(v) for v in checkpoint["state_dict"].values()):
            checkpoint["state_dict"][SWA_AVERAGE_KEY] = entry["average_model_state"]
            entry["average_model_state"] = None
            entry[SWA_AVERAGE_KEY] = True  # Lightning's load_state_dict reads only its own keys
        else:  # a full checkpoint, written by rank 0: gather the shards (every rank takes part)
            entry["average_model_state"] = {k: (v.full_tensor().cpu() if is_dtensor(v) else v)
                                            for k, v in entry["average_model_state"].items()}

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Read a sharded average back from a distributed checkpoint (see :meth:`on_save_checkpoint`)."""
        entry = checkpoint.get("callbacks", {}).get(self.state_key)
        if entry is None or not entry.get(SWA_AVERAGE_KEY):
            return
        average = self._average
        if average is None:
            raise RuntimeError(f"{type(self).__name__}: a distributed checkpoint is restored after the average is "
                               "built (ModelParallelStrategy); found no average")
        averages = average.engine.average_state_dict()
        targets = {key: averages[name].clone() for key, name in average.key_to_name().items() if key == name}
        state = {"state_dict": {SWA_AVERAGE_KEY: targets}}
        _dcp_load(trainer, state)
        n = _counter(entry["n_averaged"])
        average.check_and_load(targets, (n, n, 0), strict=True)
