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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .distributed import fsdp_modules, local_shard, reshard_fsdp
from .flat import FlatBuffer
from .ops import any_nonfinite, ema_, swa_

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
        if isinstance(self.update_after_step, bool) or not isinstance(self.update_after_step, numbers.Integral) \
                or self.update_after_step < 0:
            raise ValueError(f"EMAWarmup: update_after_step must be an int >= 0, got {self.update_after_step!r}")
        for name in ("warmup_gamma", "warmup_power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"EMAWarmup: {name} must be a number > 0, got {value!r}")
        if isinstance(self.min_decay, bool) or not isinstance(self.min_decay, numbers.Real) \
                or not 0.0 <= self.min_decay <= 1.0:
            raise ValueError(f"EMAWarmup: min_decay must be in [0, 1], got {self.min_decay!r}")

    def decay_at(self, step: int, decay: float) -> float:
        """The decay for update number ``step`` (1-based) when the target decay is ``decay``."""
        # timm/utils/model_ema.py, ModelEmaV3.get_decay(step) with use_warmup=True:
        #   step = max(0, step - self.update_after_step - 1); if step <= 0: return 0.0
        #   decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        #   decay = max(min(decay, self.decay), self.min_decay)
        k = max(0, step - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        warm = 1 - (1 + k / self.warmup_gamma) ** -self.warmup_power
        return max(min(warm, decay), self.min_decay)


def _local_tensor(tensor: Tensor) -> Tensor:
    """The tensor this process averages for a model tensor: a DTensor's local shard, else the tensor.

    Every access to the model's tensors goes through here. The shard is looked up
    each time because FSDP2 may rebind a parameter's local tensor.
    """
    return local_shard(tensor)


def _dtensor_type() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def _model_layout(average: Tensor, tensor: Tensor) -> Tensor:
    """``average`` (this rank's part) laid out like the model tensor: a DTensor wrapping it, without
    copying or communicating, when ``tensor`` is a DTensor; ``average`` itself otherwise."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return average
    return dtensor.from_local(average, tensor.device_mesh, tensor.placements, run_check=False,
                              shape=tensor.shape, stride=tensor.stride())


def _part_for(source: Tensor, tensor: Tensor) -> Tensor:
    """The part of ``source`` (a full tensor or a DTensor) that this rank holds of ``tensor``.

    Shards with the same layout are used as they are; other layouts are redistributed,
    gathered (a plain ``tensor``, every rank must call) or sliced locally (a plain ``source``).
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return source
    if isinstance(tensor, dtensor):
        if not isinstance(source, dtensor):
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(source, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
        if source.device_mesh != tensor.device_mesh or tuple(source.placements) != tuple(tensor.placements):
            source = source.redistribute(tensor.device_mesh, tensor.placements)
        return source.to_local()
    return source.full_tensor() if isinstance(source, dtensor) else source


def _named_tensors(model: ModelLike, include_buffers: bool, what: str) -> List[Tuple[str, Tensor]]:
    """(name, tensor) pairs an averager covers: parameters, then buffers if asked."""
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
        if include_buffers:
            named += list(model.named_buffers())
        return named
    if isinstance(model, Mapping):
        for name, tensor in model.items():
            if not isinstance(name, str):
                raise TypeError(f"{what}: keys must be str, got {type(name).__name__}")
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{what}: {name!r} is a {type(tensor).__name__}, not a Tensor")
        return list(model.items())
    raise TypeError(f"{what} must be an nn.Module or a mapping of name -> Tensor, got {type(model).__name__}")


def _average_dtype(dtype: Optional[torch.dtype], tensor: Tensor) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class _DeviceGroup:
    """The average of the model tensors whose average lives on one device.

    Floating tensors are averaged in ``avg``; other tensors (integer buffers such
    as ``num_batches_tracked``) are kept as their latest value in ``latest``.
    """

    def __init__(self, device: torch.device, dtype: Optional[torch.dtype],
                 named: Sequence[Tuple[str, Tensor]]):
        self.device = device
        averaged = [(n, t) for n, t in named if t.is_floating_point()]
        copied = [(n, t) for n, t in named if not t.is_floating_point()]
        self.averaged_names = [n for n, _ in averaged]
        self.averaged = [t for _, t in averaged]
        self.copied_names = [n for n, _ in copied]
        self.copied = [t for _, t in copied]
        local = [_local_tensor(t) for t in self.averaged]
        self.avg = FlatBuffer([(t.shape, _average_dtype(dtype, t), device) for t in local]).copy_(local)
        self.latest = FlatBuffer.from_tensors([_local_tensor(t) for t in self.copied], device=device)
        self.n_averaged = torch.zeros((), dtype=torch.int64, device=device)
        self.staging: Optional[FlatBuffer] = None
        self._cuda_sources = sorted({t.device.index for t in local if t.device.type == "cuda"})
        if any(t.device != device for t in local):
            pin = device.type == "cpu" and bool(self._cuda_sources)  # async device-to-host copies
            self.staging = FlatBuffer.zeros_like(local, device=device, pin_memory=pin)

    def sources(self) -> Union[List[Tensor], FlatBuffer]:
        """The tensors to average in, on this group's device (offloading copies them over)."""
        local = [_local_tensor(t) for t in self.averaged]
        if self.staging is None:
            return local
        for dst, src in zip(self.staging.views, local):
            dst.copy_(src, non_blocking=True)
        if self.device.type == "cpu":  # the host reads the staging buffer next
            for index in self._cuda_sources:
                torch.cuda.current_stream(index).synchronize()
        return self.staging

    def keep_latest(self, found_inf: Optional[Tensor]) -> None:
        for dst, tensor in zip(self.latest.views, self.copied):
            src = _local_tensor(tensor).to(self.device)
            dst.copy_(src if found_inf is None else torch.where(found_inf != 0, dst, src))

    def named_views(self) -> Iterator[Tuple[str, Tensor, Tensor]]:
        """(name, average view, live model tensor) for every tensor of the group."""
        yield from zip(self.averaged_names, self.avg.views, self.averaged)
        yield from zip(self.copied_names, self.latest.views, self.copied)

    @property
    def nbytes(self) -> int:
        return self.avg.nbytes + self.latest.nbytes + (self.staging.nbytes if self.staging is not None else 0)


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
        warmup: an :class:`EMAWarmup` (or a dict of its fields): the decay of update
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
                 warmup: Optional[Union[EMAWarmup, Mapping[str, Any]]] = None,
                 include_buffers: bool = False, skip_nonfinite: bool = True):
        if mode not in _MODES:
            raise ValueError(f"WeightAverager: mode must be 'ema' or 'swa', got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"WeightAverager: decay must be a number in [0, 1], got {decay!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"WeightAverager: dtype must be float32, float64, bfloat16, float16 or None, got {dtype}")
        for name, value, low in (("start", start, 0), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"WeightAverager: {name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"WeightAverager: {name} must be >= {low}, got {value}")
        if isinstance(warmup, Mapping):
            warmup = EMAWarmup(**warmup)
        if warmup is not None and not isinstance(warmup, EMAWarmup):
            raise TypeError(f"WeightAverager: warmup must be an EMAWarmup, a dict or None, got {type(warmup).__name__}")
        if warmup is not None and mode != "ema":
            raise ValueError("WeightAverager: warmup only applies to mode='ema'")
        self._fsdp_modules = fsdp_modules(model)
        reshard_fsdp(self._fsdp_modules)  # so named_parameters() yields the sharded parameters
        named = _named_tensors(model, include_buffers, "WeightAverager: model")
        if not named:
            raise ValueError("WeightAverager: the model has no tensors to average")

        self.mode = mode
        self.decay = float(decay)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.start = int(start)
        self.every = int(every)
        self.warmup: Optional[EMAWarmup] = warmup
        self.include_buffers = include_buffers
        self.skip_nonfinite = skip_nonfinite

        self._names = [name for name, _ in named]
        by_device: Dict[torch.device, List[Tuple[str, Tensor]]] = {}
        for name, tensor in named:
            target = self.device if self.device is not None else _local_tensor(tensor).device
            by_device.setdefault(target, []).append((name, tensor))
        self._groups = [_DeviceGroup(dev, dtype, group) for dev, group in by_device.items()]
        self._step = 0
        self._n_updates = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._groups[0].device)
        self._stash: Optional[FlatBuffer] = None

    # ----------------------------------------------------------------- updating
    @torch.no_grad()
    def update(self) -> bool:
        """Count one step and, when ``start``/``every`` say so, average the current weights in.

        One fused ``ema_``/``swa_`` call per device. Returns whether this step was an
        averaging step (a non-finite step still returns True; see :attr:`skipped`).
        """
        if self._stash is not None:
            raise RuntimeError("WeightAverager.update: the average is swapped into the model; "
                               "leave swapped() first")
        self._step += 1
        if self._step <= self.start or (self._step - self.start) % self.every:
            return False
        decay = 0.0 if self._n_updates == 0 else self.decay_at(self._step)
        self._n_updates += 1
        sources = [group.sources() for group in self._groups]
        flags = self._nonfinite_flags(sources) if self.skip_nonfinite else [None] * len(self._groups)
        for group, src, flag in zip(self._groups, sources, flags):
            if self.mode == "ema":
                ema_(group.avg, src, decay, found_inf=flag)
            else:
                swa_(group.avg, src, group.n_averaged, found_inf=flag)
            group.keep_latest(flag)
            group.n_averaged += 1 if flag is None else (flag == 0)
        if flags[0] is not None:
            self._skipped += flags[0] != 0
        return True

    def decay_at(self, step: int) -> float:
        """The EMA decay of an update at step number ``step`` (1-based), the first update's copy aside."""
        if self.warmup is None:
            return self.decay
        return self.warmup.decay_at(step, self.decay)

    def _nonfinite_flags(self, sources: Sequence[Union[List[Tensor], FlatBuffer]]) -> List[Tensor]:
        """One found_inf flag per group; any NaN/Inf anywhere flags every group, so they stay consistent."""
        flags = [any_nonfinite(src) for src in sources]
        if len(flags) == 1:
            return flags
        total = flags[0]
        for flag in flags[1:]:
            total = total + flag.to(total.device)
        return [total.to(group.device) for group in self._groups]

    # ------------------------------------------------------------ using the average
    def _live_and_average(self) -> Tuple[List[Tensor], List[Tensor]]:
        live, average = [], []
        for group in self._groups:
            for _, view, tensor in group.named_views():
                live.append(_local_tensor(tensor))
                average.append(view)
        return live, average

    @property
    def is_swapped(self) -> bool:
        """Whether the average is currently swapped into the model."""
        return self._stash is not None

    @torch.no_grad()
    def _swap_in(self) -> None:
        """Save the training weights, then write the average (cast to the model's dtypes) into the model."""
        if self._stash is not None:
            raise RuntimeError("WeightAverager: the average is already swapped into the model")
        reshard_fsdp(self._fsdp_modules)
        live, average = self._live_and_average()
        self._stash = FlatBuffer.from_tensors(live)
        try:
            torch._foreach_copy_(live, average)
        except BaseException:
            self._swap_out()
            raise

    @torch.no_grad()
    def _swap_out(self) -> None:
        """Restore the training weights saved by :meth:`_swap_in`, bit for bit."""
        if self._stash is None:
            raise RuntimeError("WeightAverager: the average is not swapped into the model")
        reshard_fsdp(self._fsdp_modules)
        live, _ = self._live_and_average()
        torch._foreach_copy_(live, self._stash.views)
        self._stash = None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the average (in the model's dtype).

        On exit, exceptions included, the training weights are restored exactly.
        Costs one copy of the swapped tensors (in the model's dtype) while inside.
        """
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    @torch.no_grad()
    def copy_to(self, model: ModelLike) -> None:
        """Write the average into ``model`` (paired by name, cast to its dtypes).

        ``model`` must have exactly the averaged names with the same shapes;
        otherwise ValueError, and nothing is written. Sharded tensors are written
        shard to shard; a plain tensor that receives a sharded average gathers it
        (a collective: call ``copy_to`` on every rank).
        """
        reshard_fsdp(fsdp_modules(model))
        targets = dict(_named_tensors(model, self.include_buffers, "copy_to: model"))
        self._check_names_and_shapes("copy_to", {n: t.shape for n, t in targets.items()})
        average = self.average_state_dict()
        self._check_meshes("copy_to", {name: (average[name], targets[name]) for name in self._names})
        for name, tensor in average.items():
            _local_tensor(targets[name]).copy_(_part_for(tensor, targets[name]))

    def average_state_dict(self) -> Dict[str, Tensor]:
        """Name -> averaged tensor, in the average's dtype and device (views into the live average).

        Holds the parameters, plus the buffers when ``include_buffers`` (integer
        buffers: their latest value). Clone the tensors to keep a snapshot. For a
        sharded (DTensor) model tensor the entry is a DTensor with the parameter's
        mesh, placements and global shape, wrapping this rank's part of the average.
        """
        laid_out = {name: _model_layout(view, tensor)
                    for group in self._groups for name, view, tensor in group.named_views()}
        return {name: laid_out[name] for name in self._names}

    # ------------------------------------------------------------------ counters
    @property
    def names(self) -> List[str]:
        """Names of the averaged tensors, in the model's order."""
        return list(self._names)

    @property
    def step(self) -> int:
        """Number of ``update()`` calls so far (gated and skipped ones included)."""
        return self._step

    @property
    def n_averaged(self) -> int:
        """Number of updates averaged in (reads a device counter: syncs with the device)."""
        return int(self._groups[0].n_averaged.item())

    @property
    def skipped(self) -> int:
        """Number of updates skipped for NaN/Inf (reads a device counter: syncs with the device)."""
        return int(self._skipped.item())

    @property
    def nbytes(self) -> int:
        """Bytes this averager holds: the average (padding included), plus any offload staging buffer."""
        return sum(group.nbytes for group in self._groups)

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
            "n_updates": self._n_updates,
            "n_averaged": self._groups[0].n_averaged.clone(),
            "skipped": self._skipped.clone(),
            "average": self.average_state_dict(),
        }

    def _check_names_and_shapes(self, what: str, shapes: Mapping[str, torch.Size]) -> None:
        missing = [n for n in self._names if n not in shapes]
        unexpected = [n for n in shapes if n not in set(self._names)]
        if missing or unexpected:
            raise ValueError(f"{what}: names do not match the averaged tensors; missing: {missing}, "
                             f"unexpected: {unexpected}")
        for name, view in self.average_state_dict().items():
            if tuple(shapes[name]) != tuple(view.shape):
                raise ValueError(f"{what}: {name!r} has shape {tuple(shapes[name])}, "
                                 f"the average has {tuple(view.shape)}")

    def _check_meshes(self, what: str, pairs: Mapping[str, Tuple[Tensor, Tensor]]) -> None:
        """ValueError if a sharded source and a sharded target live on different device meshes."""
        dtensor = _dtensor_type()
        if dtensor is None:
            return
        for name, (source, target) in pairs.items():
            if isinstance(source, dtensor) and isinstance(target, dtensor) and source.device_mesh != target.device_mesh:
                raise ValueError(f"{what}: {name!r} is sharded over {source.device_mesh}, "
                                 f"the target over {target.device_mesh}")

    def _check_state_dict(self, state: Mapping[str, Any]) -> None:
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
            if isinstance(state[key], bool) or not isinstance(state[key], numbers.Integral) or state[key] < 0:
                raise ValueError(f"load_state_dict: {key} must be an int >= 0, got {state[key]!r}")
        for key in ("n_averaged", "skipped"):
            if not isinstance(state[key], (Tensor, numbers.Integral)):
                raise TypeError(f"load_state_dict: {key} must be a Tensor or an int, got {type(state[key]).__name__}")
        average = state["average"]
        if not isinstance(average, Mapping):
            raise TypeError(f"load_state_dict: 'average' must be a mapping, got {type(average).__name__}")
        for name, tensor in average.items():
            if not isinstance(tensor, Tensor):
                raise TypeError(f"load_state_dict: average[{name!r}] is a {type(tensor).__name__}, not a Tensor")
        self._check_names_and_shapes("load_state_dict", {n: t.shape for n, t in average.items()})
        self._check_meshes("load_state_dict", {name: (average[name], tensor) for group in self._groups
                                               for name, _, tensor in group.named_views()})

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Validates everything first: on error nothing changes.

        Averages may be full tensors or DTensors (as ``torch.distributed.checkpoint``
        loads them); each rank copies in the part it holds.
        """
        if self._stash is not None:
            raise RuntimeError("load_state_dict: the average is swapped into the model; leave swapped() first")
        self._check_state_dict(state)
        for group in self._groups:
            for name, view, tensor in group.named_views():
                view.copy_(_part_for(state["average"][name], tensor))
        self._step = int(state["step"])
        self._n_updates = int(state["n_updates"])
        for group in self._groups:
            group.n_averaged.copy_(torch.as_tensor(state["n_averaged"]))
        self._skipped.copy_(torch.as_tensor(state["skipped"]))

    def __repr__(self) -> str:
        numel = sum(view.numel() for group in self._groups for _, view, _ in group.named_views())
        where = ", ".join(str(g.device) for g in self._groups)
        return (f"WeightAverager(mode={self.mode!r}, {len(self._names)} tensors, {numel} elements on {where}, "
                f"step={self._step})")
