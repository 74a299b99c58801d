"""AveragingEngine: the one owner of averaged state behind every front-end.

``WeightAverager``, ``optim.EMA`` / ``optim.SWA`` (one engine per optimizer, its
param groups as *segments*) and SWAG's moments keep their averages here;
``swa_utils.AveragedModel`` uses the pairing and staleness machinery
(:class:`ModuleTensors`). The engine owns:

- flat storage: one :class:`~swm_fused.FlatBuffer` per device, one storage per dtype
  (float32 by default; float64 tensors may stay float64), integer tensors kept as
  their latest value;
- step counters: per segment, a host count of update calls and a device count of
  averaged updates (no host sync to bump it);
- the NaN/Inf skip: one ``any_nonfinite`` flag per update, passed as ``found_inf``;
- swapping the average into the model and back, bit for bit;
- the average as a state dict (DTensors for sharded parameters) and loading it back;
- DTensor shards: every access to a model tensor goes through its local shard.

Pairing is done once. :class:`ModuleTensors` re-pairs (or raises) when the module's
structure changes: a global ``nn.Module`` registration hook bumps a counter on any
parameter, buffer or submodule assignment (``module.weight = ...``,
``load_state_dict(assign=True)``, module swaps), and two sentinel tensors per model
catch whole-model replacements that bypass ``__setattr__`` (FSDP2's ``fully_shard``
after the averager was built, ``model.to`` with ``torch.__future__`` overwrite mode).
An update checks one integer and two dict lookups, never walks the tensors.

The hot path: a whole update of a one-device engine is bound once in C++
(:meth:`BoundLists.bind_step`: the lists, the counters, the tensors kept as their latest
value), and while nothing that binding depends on changed (the checks above, the backend
choice, a flattened model's storages: checked in C++ by their reference counts) an update
is those O(1) checks and one plain C call, ``swm_fused._C.bound_step``. Anything else takes
the full path, which checks everything and binds again.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import dispatch as _dispatch
from .distributed import dtensor_type, fsdp_modules, local_shard, reshard_fsdp
from .flat import FlatBuffer
from .ops import BoundLists, any_nonfinite, ema_, ema_multi_, swa_, swag_
from .ops import _check_decay

__all__ = ["AveragingEngine", "FlatParameters", "ModuleTensors", "StaleModelError", "flatten_parameters",
           "structure_epoch"]

ModelLike = Union[nn.Module, Mapping[str, Tensor]]
AVERAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class StaleModelError(ValueError):
    """The model's tensors changed in a way the average cannot follow (names, shapes or devices)."""


# ---------------------------------------------------------------------------- structure epoch
_EPOCH = [0]
_HOOK_HANDLES: List[Any] = []


def _bumper(table: str):
    def bump(module: nn.Module, name: str, value: Any) -> None:
        # called before the assignment; re-assigning the same object (``self.buf += 1``) changes nothing
        if module.__dict__.get(table, {}).get(name, _MISSING) is not value:
            _EPOCH[0] += 1
    return bump


_MISSING = object()


def _install_hooks() -> None:
    if _HOOK_HANDLES:
        return
    from torch.nn.modules import module as _module
    _HOOK_HANDLES.extend([_module.register_module_parameter_registration_hook(_bumper("_parameters")),
                          _module.register_module_buffer_registration_hook(_bumper("_buffers")),
                          _module.register_module_module_registration_hook(_bumper("_modules"))])


def structure_epoch() -> int:
    """A counter that grows whenever any ``nn.Module`` registers a parameter, buffer or submodule."""
    _install_hooks()
    return _EPOCH[0]


# ------------------------------------------------------------------------------ DTensor helpers
def model_layout(average: Tensor, tensor: Tensor) -> Tensor:
    """``average`` (this rank's part) laid out like the model tensor: a DTensor wrapping it, without
    copying or communicating, when ``tensor`` is a DTensor; ``average`` itself otherwise."""
    dtensor = dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return average
    return dtensor.from_local(average, tensor.device_mesh, tensor.placements, run_check=False,
                              shape=tensor.shape, stride=tensor.stride())


def part_for(source: Tensor, tensor: Tensor) -> Tensor:
    """The part of ``source`` (a full tensor or a DTensor) that this rank holds of ``tensor``.

    Shards with the same layout are used as they are; other layouts are redistributed,
    gathered (a plain ``tensor``, every rank must call) or sliced locally (a plain ``source``).
    """
    dtensor = dtensor_type()
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


def check_meshes(what: str, pairs: Mapping[str, Tuple[Tensor, Tensor]]) -> None:
    """ValueError if a sharded source and a sharded target live on different device meshes."""
    dtensor = dtensor_type()
    if dtensor is None:
        return
    for name, (source, target) in pairs.items():
        if isinstance(source, dtensor) and isinstance(target, dtensor) and source.device_mesh != target.device_mesh:
            raise ValueError(f"{what}: {name!r} is sharded over {source.device_mesh}, "
                             f"the target over {target.device_mesh}")


def named_tensors(model: ModelLike, include_buffers: bool, what: str) -> List[Tuple[str, Tensor]]:
    """(name, tensor) pairs of a module (parameters, then buffers if asked) or of a mapping."""
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


# ------------------------------------------------------------------------------ model tensors
class ModuleTensors:
    """A model's named tensors, paired once and re-paired only when the model's structure changes.

    :meth:`tensors` returns the cached list after an O(1) check (the structure epoch and
    two sentinel lookups). After a change the model is walked once: the same names and
    shapes re-pair silently (the average continues with the new tensors); anything else
    raises :class:`StaleModelError` naming the difference. A mapping model is read by
    reference and never re-paired.
    """

    def __init__(self, model: ModelLike, include_buffers: bool = False, what: str = "model"):
        self.model = model
        self.include_buffers = include_buffers
        self.what = what
        self.fsdp = fsdp_modules(model)
        reshard_fsdp(self.fsdp)  # so named_parameters() yields the sharded parameters
        named = named_tensors(model, include_buffers, what)
        self.names: List[str] = [n for n, _ in named]
        self._tensors: List[Tensor] = [t for _, t in named]
        self._shapes = [t.shape for t in self._tensors]
        self.has_dtensor = any(local_shard(t) is not t for t in self._tensors)
        self._epoch = structure_epoch()
        self._sentinels = self._make_sentinels()
        self.version = 0  # bumped on every re-pairing

    def _make_sentinels(self) -> List[Tuple[Dict[str, Any], str, Tensor]]:
        if not isinstance(self.model, nn.Module) or not self.names:
            return []
        out = []
        for index in {0, len(self.names) - 1}:
            prefix, _, key = self.names[index].rpartition(".")
            try:
                owner = self.model.get_submodule(prefix) if prefix else self.model
            except AttributeError:
                continue
            table = owner._parameters if key in owner._parameters else owner._buffers
            out.append((table, key, self._tensors[index]))
        return out

    def changed(self) -> bool:
        """Whether the model's structure may have changed since the last pairing (O(1))."""
        if _EPOCH[0] != self._epoch:
            return True
        for table, key, tensor in self._sentinels:
            if table.get(key) is not tensor:
                return True
        return False

    def tensors(self) -> List[Tensor]:
        """The paired model tensors, re-paired first if the model changed."""
        if self.fsdp:
            reshard_fsdp(self.fsdp)
        if self.changed():
            self.repair()
        return self._tensors

    def repair(self) -> None:
        """Walk the model again; same names and shapes re-pair, anything else raises StaleModelError."""
        if self.fsdp:
            reshard_fsdp(self.fsdp)
        named = named_tensors(self.model, self.include_buffers, self.what)
        names = [n for n, _ in named]
        if names != self.names:
            missing = [n for n in self.names if n not in set(names)]
            extra = [n for n in names if n not in set(self.names)]
            raise StaleModelError(
                f"{self.what}: the model's tensors changed since they were paired: missing {missing[:3]}, "
                f"new {extra[:3]}{'' if missing or extra else ' (same names, another order)'}; "
                "build a new averager for the new model")
        for (name, tensor), shape in zip(named, self._shapes):
            if tensor.shape != shape:
                raise StaleModelError(f"{self.what}: {name!r} changed shape from {tuple(shape)} to "
                                      f"{tuple(tensor.shape)} since it was paired")
        tensors = [t for _, t in named]
        if any(a is not b for a, b in zip(tensors, self._tensors)):
            self._tensors = tensors
            self.has_dtensor = any(local_shard(t) is not t for t in tensors)
            self.version += 1
        self._epoch = _EPOCH[0]
        self._sentinels = self._make_sentinels()


class _FixedTensors:
    """Tensors held by reference (an optimizer's params, a mapping): nothing to re-pair."""

    def __init__(self, named: Sequence[Tuple[str, Tensor]]):
        self.names = [n for n, _ in named]
        self._tensors = [t for _, t in named]
        self.has_dtensor = any(local_shard(t) is not t for t in self._tensors)
        self.version = 0
        self.fsdp: List[nn.Module] = []

    def tensors(self) -> List[Tensor]:
        return self._tensors


_dispatch_modes: Callable[[], int] = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


class _BoundStep:
    """A whole update bound in C++ (BoundLists.bind_step) and what it was bound under."""

    __slots__ = ("call", "key", "bound", "mode", "epoch", "version", "sentinels", "tune_generation")

    def __init__(self, call: Callable[[int, float, bool], int], key: int, bound: BoundLists, mode: str,
                 epoch: Optional[int], version: int, sentinels: Tuple[Tuple[Dict[str, Any], str, Tensor], ...],
                 tune_generation: int):
        self.call = call  # swm_fused._C.bound_step
        self.key = key
        self.bound = bound  # keeps the C++ binding alive
        self.mode = mode
        self.epoch = epoch  # the structure epoch bound under (None: fixed tensors, nothing to re-pair)
        self.version = version
        self.sentinels = sentinels
        self.tune_generation = tune_generation


def _average_dtype(dtype: Optional[torch.dtype], tensor: Tensor) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


DtypeArg = Union[Optional[torch.dtype], Sequence[Optional[torch.dtype]]]


def _dtype_of(dtype: DtypeArg, index: int) -> Optional[torch.dtype]:
    """The average dtype asked for tensor ``index``: one for all, or the entry of a per-tensor tuple."""
    return dtype[index] if isinstance(dtype, tuple) else dtype


# ------------------------------------------------------------------------------ device groups
class _Group:
    """The average of the tensors whose average lives on one device.

    Floating tensors are averaged in ``avg``; other tensors (integer buffers such
    as ``num_batches_tracked``) are kept as their latest value in ``latest``.
    ``averaged`` / ``copied`` are indices into the engine's tensor list.
    """

    def __init__(self, device: torch.device, dtype: DtypeArg, indices: Sequence[int],
                 tensors: Sequence[Tensor], segment_of: Sequence[int], n_segments: int, second_moment: bool):
        self.device = device
        self.averaged = [i for i in indices if tensors[i].is_floating_point()]
        self.copied = [i for i in indices if not tensors[i].is_floating_point()]
        local = [local_shard(tensors[i]) for i in self.averaged]
        self.avg = FlatBuffer([(t.shape, _average_dtype(_dtype_of(dtype, i), t), device)
                               for i, t in zip(self.averaged, local)]).copy_(local)
        self.latest = FlatBuffer.from_tensors([local_shard(tensors[i]) for i in self.copied], device=device)
        self.sq: Optional[FlatBuffer] = FlatBuffer.zeros_like(self.avg) if second_moment else None
        self.counts = torch.zeros(n_segments, dtype=torch.int64, device=device)
        self.segment_of_averaged = [segment_of[i] for i in self.averaged]
        self.segment_of_copied = [segment_of[i] for i in self.copied]
        self.staging: Optional[FlatBuffer] = None
        self._cuda_sources = sorted({t.device.index for t in local if t.device.type == "cuda"})
        if any(t.device != device for t in local):
            pin = device.type == "cpu" and bool(self._cuda_sources)  # async device-to-host copies
            self.staging = FlatBuffer.zeros_like(local, device=device, pin_memory=pin)
        self.source_device = local[0].device if local else device

    def sources(self, local: List[Tensor]) -> Union[List[Tensor], FlatBuffer]:
        """The tensors to average in, on this group's device (offloading copies them over)."""
        if self.staging is None:
            return local
        for dst, src in zip(self.staging.views, local):
            dst.copy_(src, non_blocking=True)
        if self.device.type == "cpu":  # the host reads the staging buffer next
            for index in self._cuda_sources:
                torch.cuda.current_stream(index).synchronize()
        return self.staging

    @property
    def nbytes(self) -> int:
        extra = sum(b.nbytes for b in (self.staging, self.sq) if b is not None)
        return self.avg.nbytes + self.latest.nbytes + extra


# ------------------------------------------------------------------------------------ engine
class AveragingEngine:
    """EMA/SWA state of a set of named tensors, in flat storage, with device-side counters.

    Args:
        model: an ``nn.Module`` (its parameters, plus buffers with ``include_buffers``),
            a mapping name -> tensor, or a sequence of (name, tensor) pairs (held by reference).
        dtype: the average's dtype; ``None`` keeps float64 tensors in float64 and
            averages the rest in float32. A list or tuple gives one entry (a dtype or ``None``)
            per tensor, in :attr:`names` order (entries of non-floating tensors are ignored), e.g.
            to keep each average in its tensor's own dtype as timm's and diffusers' EMAs do.
        device: where the average lives; ``None`` keeps it next to each tensor.
        skip_nonfinite: an update whose tensors hold NaN/Inf changes nothing and counts in
            :attr:`skipped` (checked on the device).
        segments: the segment of each tensor (e.g. its optimizer param group); default all 0.
            Segments can be updated on their own and keep their own counters.
        second_moment: also keep the running mean of squares (``update("swag")``, SWAG's moments).
        what: the name used in error messages.
    """

    def __init__(self, model: Union[ModelLike, Sequence[Tuple[str, Tensor]]], *,
                 dtype: DtypeArg = torch.float32,
                 device: Optional[Union[str, torch.device]] = None, include_buffers: bool = False,
                 skip_nonfinite: bool = True, segments: Optional[Sequence[int]] = None, second_moment: bool = False,
                 what: str = "AveragingEngine"):
        if isinstance(dtype, (list, tuple)):
            dtype = tuple(dtype)
            bad = [d for d in dtype if d is not None and d not in AVERAGE_DTYPES]
            if bad:
                raise TypeError(f"{what}: each dtype must be float32, float64, bfloat16, float16 or None, "
                                f"got {bad[0]}")
        elif dtype is not None and dtype not in AVERAGE_DTYPES:
            raise TypeError(f"{what}: dtype must be float32, float64, bfloat16, float16 or None, got {dtype}")
        if isinstance(model, (nn.Module, Mapping)):
            self.source: Union[ModuleTensors, _FixedTensors] = ModuleTensors(model, include_buffers, f"{what}: model")
        else:
            self.source = _FixedTensors(list(model))
        tensors = self.source.tensors()
        if not tensors:
            raise ValueError(f"{what}: the model has no tensors to average")
        if isinstance(dtype, tuple) and len(dtype) != len(tensors):
            raise ValueError(f"{what}: {len(dtype)} dtypes for {len(tensors)} tensors")
        self.what = what
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.skip_nonfinite = skip_nonfinite
        if segments is None:
            segments = [0] * len(tensors)
        if len(segments) != len(tensors):
            raise ValueError(f"{what}: {len(segments)} segment indices for {len(tensors)} tensors")
        self.segment_of = [int(s) for s in segments]
        self.second_moment = second_moment
        self.n_segments = max(self.segment_of) + 1
        self._build(tensors)
        self.attempts = [0] * self.n_segments  # update calls that covered each segment, skipped ones included
        # Segments with equal tokens have had identical update histories, so equal device counts.
        self._tokens = [0] * self.n_segments
        self._next_token = 1
        self.skipped_tensor = torch.zeros((), dtype=torch.int64, device=self._groups[0].device)
        self._stash: Optional[FlatBuffer] = None
        self._stash_indices: List[int] = []
        self._source_version = self.source.version
        self._flat_source = self._match_flat(model)
        self._flat_version = self.source.version
        self._cached_lists: Optional[List[List[Tensor]]] = None
        self._bound_cache: Dict[Tuple[int, int], Tuple[Any, Any, BoundLists]] = {}
        self._cache_version = -1
        self._fast: Optional[_BoundStep] = None  # the whole update bound in C++ (_update_all binds it)

    def _match_flat(self, model: Any) -> Optional[FlatParameters]:
        """The model's FlatParameters when this engine's one group reads exactly its views in order."""
        handle = flat_parameters_of(model)
        if handle is None or len(self._groups) != 1 or not handle.intact():
            return None
        group = self._groups[0]
        tensors = self.source.tensors()
        if group.copied or group.staging is not None or len(group.averaged) != len(handle.params) or any(
                tensors[i] is not p for i, p in zip(group.averaged, handle.params)):
            return None
        if handle.buffer.layout_key() != group.avg.layout_key():
            return None
        return handle

    def _build(self, tensors: Sequence[Tensor]) -> None:
        by_device: Dict[torch.device, List[int]] = {}
        for i, tensor in enumerate(tensors):
            target = self.device if self.device is not None else local_shard(tensor).device
            by_device.setdefault(target, []).append(i)
        self._groups = [_Group(dev, self.dtype, idx, tensors, self.segment_of, self.n_segments, self.second_moment)
                        for dev, idx in by_device.items()]
        # views by tensor index
        self._view_of: Dict[int, Tensor] = {}
        for group in self._groups:
            self._view_of.update(zip(group.averaged, group.avg.views))
            self._view_of.update(zip(group.copied, group.latest.views))
        self._plain = not self.source.has_dtensor

    # ------------------------------------------------------------------ introspection
    @property
    def names(self) -> List[str]:
        return list(self.source.names)

    @property
    def devices(self) -> List[torch.device]:
        return [g.device for g in self._groups]

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self._groups)

    def staging_buffers(self) -> List[FlatBuffer]:
        """The offload staging buffers (one per device group that reads from another device)."""
        return [g.staging for g in self._groups if g.staging is not None]

    def numel(self) -> int:
        return sum(g.avg.numel() + g.latest.numel() for g in self._groups)

    def views(self) -> List[Tensor]:
        """The average of every tensor, in the model's order (views into the flat storage)."""
        return [self._view_of[i] for i in range(len(self.source.names))]

    def flat_average(self, group: int = 0) -> FlatBuffer:
        """The flat storage of the averages of device group ``group`` (floating tensors only)."""
        return self._groups[group].avg

    def flat_second_moment(self, group: int = 0) -> FlatBuffer:
        """The flat storage of the means of squares of device group ``group`` (``second_moment`` only)."""
        sq = self._groups[group].sq
        if sq is None:
            raise ValueError(f"{self.what}: built without second_moment")
        return sq

    def second_moment_state_dict(self) -> Dict[str, Tensor]:
        """Name -> mean of squares (views), for floating tensors (``second_moment`` only)."""
        out: Dict[int, Tensor] = {}
        for g in range(len(self._groups)):
            out.update(zip(self._groups[g].averaged, self.flat_second_moment(g).views))
        return {self.source.names[i]: out[i] for i in sorted(out)}

    def model_tensors(self) -> List[Tensor]:
        """The model tensors this engine reads, in order (re-paired first if the model changed)."""
        return self._current()

    def count(self, segment: int = 0) -> Tensor:
        """The device counter of averaged (not skipped) updates of ``segment`` (a 0-dim view)."""
        return self._groups[0].counts[segment]

    @property
    def skipped(self) -> Tensor:
        """The device counter of updates skipped for NaN/Inf (0-dim int64)."""
        return self.skipped_tensor

    def counters(self) -> Tuple[int, int]:
        """``(averaged, skipped)``: segment 0's averaged updates and the updates skipped for NaN/Inf, as
        ints (reads the device counters: syncs with the device)."""
        return int(self.count(0).item()), int(self.skipped_tensor.item())

    def __repr__(self) -> str:
        where = ", ".join(str(g.device) for g in self._groups)
        return f"AveragingEngine({len(self.source.names)} tensors, {self.numel()} elements on {where})"

    # ------------------------------------------------------------------ reading the model
    def _current(self) -> List[Tensor]:
        tensors = self.source.tensors()
        if self.source.version != self._source_version:
            self._on_repair(tensors)
        return tensors

    def _on_repair(self, tensors: Sequence[Tensor]) -> None:
        for group in self._groups:
            for i in group.averaged + group.copied:
                device = local_shard(tensors[i]).device
                if group.staging is None and device != group.device:
                    raise StaleModelError(f"{self.what}: {self.source.names[i]!r} moved to {device}; its average "
                                          f"lives on {group.device}. Build a new averager after moving the model")
        self._plain = not self.source.has_dtensor
        self._source_version = self.source.version

    def _local(self, tensors: Sequence[Tensor], indices: Sequence[int]) -> List[Tensor]:
        if self._plain:
            return [tensors[i] for i in indices]
        return [local_shard(tensors[i]) for i in indices]

    def _check_device(self, group: _Group, local: Sequence[Tensor]) -> None:
        if group.staging is None and local and local[0].device != group.device:
            raise StaleModelError(f"{self.what}: the model moved from {group.device} to {local[0].device} since "
                                  "the averager was built; build a new one after moving the model")

    # ----------------------------------------------------------------------- updating
    def update(self, mode: str, *, decay: Union[float, Sequence[float]] = 0.0,
               segments: Optional[Sequence[int]] = None, source: Optional[FlatBuffer] = None) -> None:
        """Average the current tensors in: ``mode="ema"`` with ``decay`` (one per segment, or one for all),
        ``mode="swa"`` with weight ``1 / (count + 1)`` read on the device, ``mode="swag"`` likewise for
        the mean and the mean of squares (needs ``second_moment``).

        ``source``, for a one-device engine over floating tensors, replaces the model's tensors
        with a FlatBuffer laid out like :meth:`flat_average` (e.g. :meth:`FlatBuffer.like` over a
        row of your own), so the op runs over one vector.

        ``segments`` limits the update to those segments (default: all). One fused call per
        device and per set of segments sharing a weight; NaN/Inf in any updated tensor skips
        the whole update (no host sync).
        """
        if segments is None and source is None and self._fast is not None and self.fast_update(mode, decay):
            return
        self._update(mode, decay, segments, source)

    def fast_update(self, mode: str, decay: Any = 0.0) -> bool:
        """``update(mode, decay=decay)`` of every segment through the step bound in C++, when nothing it
        was bound under changed; False (nothing done) when the full :meth:`update` is needed.

        The checks, all O(1): not swapped; the same mode; ``decay`` a float in [0, 1] (EMA); no backend
        forced and no ``tune()`` since binding; no ``TorchDispatchMode`` active (the bound CPU step calls
        its kernels directly: under a mode the ops go through the dispatcher, where the mode sees them);
        the model's structure epoch, sentinels and pairing version as bound; then, in C++, the sources
        on the average's device and a flattened model's storages holding exactly the references they
        held at binding (FlatParameters.intact).
        """
        fast = self._fast
        if fast is None or mode != fast.mode or self._stash is not None or not _dispatch.automatic_choice() \
                or fast.tune_generation != _dispatch.TUNE_GENERATION[0] or self.source.version != fast.version \
                or (fast.epoch is not None and fast.epoch != _EPOCH[0]) or _dispatch_modes():
            return False
        for table, key, tensor in fast.sentinels:
            if table.get(key) is not tensor:
                return False
        if mode == "ema":
            if decay.__class__ is not float or not 0.0 <= decay <= 1.0:
                return False
            weight = 1.0 - decay
        else:
            weight = 0.0
        if self._run_bound(fast, weight):
            return False
        self._count_update()
        return True

    def _run_bound(self, fast: "_BoundStep", weight: float) -> int:
        """Run the bound step: 0 done; 1 nothing done (stale sources: the binding is dropped)."""
        try:
            status = fast.call(fast.key, weight, self.skip_nonfinite)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"step_: {exc}") from None
        if status:
            self._fast = None
        return status

    def _count_update(self) -> None:
        """Host counters of an update of every segment."""
        token = self._next_token
        self._next_token = token + 1
        if self.n_segments == 1:
            self.attempts[0] += 1
            self._tokens[0] = token
            return
        for s in range(self.n_segments):
            self.attempts[s] += 1
        self._tokens = [token] * self.n_segments

    @torch.no_grad()
    def _update(self, mode: str, decay: Union[float, Sequence[float]], segments: Optional[Sequence[int]],
                source: Optional[FlatBuffer]) -> None:
        if self._stash is not None:
            raise RuntimeError(f"{self.what}: the average is swapped into the model; swap it back first")
        if mode not in ("ema", "swa", "swag"):
            raise ValueError(f"{self.what}: mode must be 'ema', 'swa' or 'swag', got {mode!r}")
        if mode == "swag" and not self.second_moment:
            raise ValueError(f"{self.what}: mode 'swag' needs an engine built with second_moment=True")
        if segments is None and source is None and mode != "swag" and self._tokens_uniform() \
                and not isinstance(decay, (list, tuple)):
            self._update_all(mode, float(decay))
            return
        if source is not None and (len(self._groups) != 1 or self._groups[0].copied
                                   or source.layout_key() != self._groups[0].avg.layout_key()):
            raise ValueError(f"{self.what}: source must be laid out like flat_average() of a one-device engine "
                             "over floating tensors")
        segs = list(range(self.n_segments)) if segments is None else sorted(set(segments))
        decays = [float(decay)] * self.n_segments if not isinstance(decay, (list, tuple)) else list(decay)
        tensors = self._current()
        whole = len(segs) == self.n_segments
        # cohorts: segments updated with one weight in one call
        if mode == "ema":
            keys = {s: decays[s] for s in segs}
        else:
            keys = {s: self._tokens[s] for s in segs}
        cohorts: Dict[Any, List[int]] = {}
        for s in segs:
            cohorts.setdefault(keys[s], []).append(s)
        selected = set(segs)

        plan = []  # (group, [(cohort key, avg, src)], copied local, copied views)
        for group in self._groups:
            local_all = self._local(tensors, group.averaged)
            self._check_device(group, local_all)
            if source is not None and whole and len(cohorts) == 1:
                # equal layouts (checked above): the storages pair directly, no per-call layout comparison
                parts = [(next(iter(cohorts)), group.avg.storages, source.storages)]
                nonfinite_src = [source.storages]
            elif whole and len(cohorts) == 1 and self._flat_source is not None and self._flat_source.intact() \
                    and self.source.version == self._flat_version:
                src = self._flat_source.buffer.storages  # a flattened model: one kernel over one vector
                parts = [(next(iter(cohorts)), group.avg.storages, src)]
                nonfinite_src = [src]
            elif whole and len(cohorts) == 1:
                src = group.sources(local_all)
                parts = [(next(iter(cohorts)), group.avg, src)]
                nonfinite_src = [src]
            else:
                if source is not None:
                    raise ValueError(f"{self.what}: source needs a whole update")
                parts = []
                nonfinite_src = []
                for key, members in cohorts.items():
                    chosen = set(members)
                    pos = [j for j, s in enumerate(group.segment_of_averaged) if s in chosen]
                    if not pos:
                        continue
                    src_list = group.sources(local_all)
                    src_list = src_list.views if isinstance(src_list, FlatBuffer) else src_list
                    src = [src_list[j] for j in pos]
                    parts.append((key, [group.avg.views[j] for j in pos], src))
                    nonfinite_src.append(src)
            copied_pos = [j for j, s in enumerate(group.segment_of_copied) if s in selected]
            plan.append((group, parts, nonfinite_src, copied_pos))

        flag = None
        if self.skip_nonfinite:
            flags = [any_nonfinite(src) for _, _, srcs, _ in plan for src in srcs]
            if flags:
                flag = flags[0]
                for other in flags[1:]:
                    flag = flag + other.to(flag.device)
        for group, parts, _, copied_pos in plan:
            group_flag = None if flag is None else flag.to(group.device)
            for key, avg, src in parts:
                if mode == "ema":
                    ema_(avg, src, key, found_inf=group_flag)
                elif mode == "swa":
                    swa_(avg, src, group.counts[cohorts[key][0]], found_inf=group_flag)
                else:
                    if isinstance(avg, FlatBuffer):
                        sq: Any = group.sq
                    elif avg is group.avg.storages:
                        sq = group.sq.storages
                    else:
                        sq = [group.sq.views[group.avg.views.index(a)] for a in avg]
                    swag_(avg, sq, src, group.counts[cohorts[key][0]], found_inf=group_flag)
            if copied_pos:
                live = self._local(tensors, [group.copied[j] for j in copied_pos])
                for j, tensor in zip(copied_pos, live):
                    dst = group.latest.views[j]
                    src_t = tensor.to(group.device)
                    dst.copy_(src_t if group_flag is None else torch.where(group_flag != 0, dst, src_t))
            inc = 1 if group_flag is None else (group_flag == 0).to(torch.int64)
            if whole:
                group.counts += inc
            else:
                idx = torch.tensor(segs, device=group.device)
                group.counts.index_add_(0, idx, torch.ones(len(segs), dtype=torch.int64, device=group.device) * inc)
        if flag is not None:
            self.skipped_tensor += (flag != 0).to(self.skipped_tensor.device)
        self._fast = None  # segments' histories may diverge; a whole update binds again
        for s in segs:
            self.attempts[s] += 1
        if mode == "swa" or True:  # histories diverge when a subset is updated
            remap: Dict[int, int] = {}
            for s in segs:
                old = self._tokens[s]
                if old not in remap:
                    remap[old] = self._next_token
                    self._next_token += 1
                self._tokens[s] = remap[old]

    def _tokens_uniform(self) -> bool:
        return self.n_segments == 1 or len(set(self._tokens)) == 1

    def _group_sources(self, tensors: Sequence[Tensor]) -> List[Tuple[Any, Union[List[Tensor], FlatBuffer]]]:
        """Per group, (average, what to average in): the storages of the average and of the flat model
        (same layout, checked once when the engine was built: they pair storage by storage, with no
        per-call layout comparison), or the average's FlatBuffer and the (cached) list of tensors."""
        flat = self._flat_source
        if flat is not None and self.source.version == self._flat_version and flat.intact():
            return [(self._groups[0].avg.storages, flat.buffer.storages)]
        if self._plain and self._cache_version == self.source.version and self._cached_lists is not None:
            lists = self._cached_lists
        else:
            lists = [self._local(tensors, g.averaged) for g in self._groups]
            if self._plain:
                self._cached_lists, self._cache_version = lists, self.source.version
        for group, local in zip(self._groups, lists):
            self._check_device(group, local)
        return [(g.avg, g.sources(local) if g.staging is not None else local) for g, local in zip(self._groups, lists)]

    def _bound(self, avg: Any, src: Any) -> BoundLists:
        """(average, source) bound once in C++ (swm_fused.BoundLists), rebound when either object changes:
        the source list is rebuilt whenever the model's structure changes, so a binding never goes stale."""
        cached = self._bound_cache.get((id(avg), id(src)))
        if cached is None or cached[0] is not avg or cached[1] is not src:
            cached = (avg, src, BoundLists(avg, src))
            if len(self._bound_cache) > 4 * len(self._groups):
                self._bound_cache.clear()
            self._bound_cache[(id(avg), id(src))] = cached
        return cached[2]

    def _update_all(self, mode: str, decay: float) -> None:
        """Every segment, one weight: one fused call and one NaN/Inf check per device group. On one
        device the check, the average and the counters are one call into C++, bound here
        (:meth:`_bind_fast`) for :meth:`fast_update`; other backends run BoundLists.step_."""
        if mode == "ema":
            decay = _check_decay("step_", decay)
        tensors = self._current()
        sources = self._group_sources(tensors)
        bound = [self._bound(avg, src) for avg, src in sources]
        if len(bound) == 1:
            group = self._groups[0]
            fast = self._bind_fast(mode, bound[0], sources[0][0] is group.avg.storages, group, tensors)
            if fast is not None and not self._run_bound(fast, 1.0 - decay if mode == "ema" else 0.0):
                self._count_update()
                return
            flag = bound[0].step_(group.counts, decay=decay if mode == "ema" else None,
                                  skip_nonfinite=self.skip_nonfinite)
            self._copy_latest(group, tensors, flag)
            if flag is not None:
                self.skipped_tensor.add_(flag.to(device=self.skipped_tensor.device, dtype=torch.int64))
        else:
            self._update_groups(mode, decay, tensors, bound)
        for s in range(self.n_segments):
            self.attempts[s] += 1
        token = self._next_token
        self._next_token += 1
        self._tokens = [token] * self.n_segments

    def _bind_fast(self, mode: str, bound: BoundLists, flat: bool, group: _Group,
                   tensors: Sequence[Tensor]) -> Optional["_BoundStep"]:
        """Bind the whole update of the one device group (``flat``: the sources are a flattened model's
        storages, pinned by reference count); None where it cannot be bound (DTensor or FSDP
        sources, offload staging, a backend other than the compiled one)."""
        self._fast = None
        if not self._plain or self.source.fsdp or group.staging is not None or mode not in ("ema", "swa") \
                or _dispatch_modes():
            return None
        key = bound.bind_step(group.counts, swa=mode == "swa", skipped=self.skipped_tensor,
                              latest=group.latest.views if group.copied else (),
                              live=self._local(tensors, group.copied), pin_sources=flat)
        if key is None:
            return None
        from . import _C
        watch = isinstance(self.source, ModuleTensors)
        fast = _BoundStep(_C.bound_step, key, bound, mode, _EPOCH[0] if watch else None, self.source.version,
                          tuple(self.source._sentinels) if watch else (), _dispatch.TUNE_GENERATION[0])
        # kept for fast_update only when the backend was chosen automatically (fast_update checks that)
        self._fast = fast if _dispatch.forced_backend() is None else None
        return fast

    def _copy_latest(self, group: _Group, tensors: Sequence[Tensor], flag: Optional[Tensor]) -> None:
        """Keep the latest value of the group's non-floating tensors (unless the step was flagged)."""
        if group.copied:
            live = self._local(tensors, group.copied)
            for dst, tensor in zip(group.latest.views, live):
                src_t = tensor.to(group.device)
                dst.copy_(src_t if flag is None else torch.where(flag != 0, dst, src_t))

    def _update_groups(self, mode: str, decay: float, tensors: Sequence[Tensor], bound: List[BoundLists]) -> None:
        """Several devices: one NaN/Inf flag for all of them, then each device's average."""
        flag = None
        if self.skip_nonfinite:
            flags = [b.any_nonfinite() for b in bound]
            flag = flags[0]
            for other in flags[1:]:
                flag = flag + other.to(flag.device)
        for group, lists in zip(self._groups, bound):
            group_flag = flag if flag is None or flag.device == group.device else flag.to(group.device)
            if mode == "ema":
                lists.ema_(decay, found_inf=group_flag)
            else:
                lists.swa_(group.counts[0], found_inf=group_flag)
            self._copy_latest(group, tensors, group_flag)
            if group_flag is None:
                group.counts.add_(1)
            else:
                skipped = group_flag.to(torch.int64)
                group.counts.sub_(skipped).add_(1)
                if group.device == self.skipped_tensor.device:
                    self.skipped_tensor.add_(skipped)
        if flag is not None and self._groups[0].device != self.skipped_tensor.device:
            self.skipped_tensor.add_(flag.to(device=self.skipped_tensor.device, dtype=torch.int64))

    # ------------------------------------------------------------------- several engines
    def shares_layout(self, other: "AveragingEngine") -> bool:
        """Whether ``other`` averages the same model object's tensors into averages laid out like this
        engine's (same names, device groups, flat layouts and NaN/Inf setting), so both can be updated
        by one :meth:`ema_multi` pass over the source."""
        mine, theirs = getattr(self.source, "model", self.source), getattr(other.source, "model", other.source)
        if other is self:
            return True
        if mine is not theirs or self.source.names != other.source.names \
                or self.skip_nonfinite != other.skip_nonfinite or len(self._groups) != len(other._groups):
            return False
        return all(a.device == b.device and a.averaged == b.averaged and a.copied == b.copied
                   and a.avg.layout_key() == b.avg.layout_key() for a, b in zip(self._groups, other._groups))

    @staticmethod
    @torch.no_grad()
    def ema_multi(engines: Sequence["AveragingEngine"], weights: Sequence[float]) -> None:
        """EMA of one model into K engines at once: ``average_k = lerp(average_k, model, weights[k])``.

        When every engine :meth:`shares_layout` with the first, the source is read once per device
        group by one :func:`~swm_fused.ema_multi_` call over the K flat averages, with one NaN/Inf
        check shared by all K (no host sync); each engine's counters move as after
        ``update("ema", decay=d_k)``, whose result it matches bit for bit when ``weights[k] == 1 - d_k``
        exactly (float64 averages compute the weight in float64: 0.3 and 1 - 0.7 differ by an ulp).
        Averages may differ in dtype. On one device the check, the K averages and every engine's
        counters are one call into C++ over lists bound once (:meth:`BoundLists.step_multi_`).
        Engines that do not share a layout are updated one by one (same results, K passes).
        """
        engines = list(engines)
        weights = [float(w) for w in weights]
        if not engines:
            raise ValueError("ema_multi: give at least one engine")
        if len(weights) != len(engines):
            raise ValueError(f"ema_multi: {len(weights)} weights for {len(engines)} engines")
        for e in engines:
            if e._stash is not None:
                raise RuntimeError(f"{e.what}: the average is swapped into the model; swap it back first")
            if e.n_segments != 1:
                raise ValueError(f"{e.what}: ema_multi needs engines with one segment")
        first = engines[0]
        if not all(first.shares_layout(e) for e in engines[1:]):
            for e, w in zip(engines, weights):
                e.update("ema", decay=1.0 - w)
            return
        tensors = first._current()
        for e in engines[1:]:
            e._current()
        sources = first._group_sources(tensors)
        if len(sources) == 1:
            # One device: the NaN/Inf check, the K averages and every engine's counters in one call
            # into C++ over lists bound once (BoundLists.step_multi_), as update() does for one engine.
            avg0, src = sources[0]
            flat = avg0 is first._groups[0].avg.storages  # a flattened model pairs storage by storage
            avgs = [e._groups[0].avg.storages if flat else e._groups[0].avg for e in engines]
            flag = first._bound_multi(avgs, src).step_multi_(
                weights, [e._groups[0].counts for e in engines], skip_nonfinite=first.skip_nonfinite,
                skipped=[e.skipped_tensor for e in engines])
            if first._groups[0].copied:
                for e in engines:
                    e._copy_latest(e._groups[0], tensors, flag)
            for e in engines:
                e.attempts[0] += 1
                e._tokens = [e._next_token]
                e._next_token += 1
            return
        flag = None
        if first.skip_nonfinite:
            flags = [any_nonfinite(src) for _, src in sources]
            flag = flags[0]
            for other in flags[1:]:
                flag = flag + other.to(flag.device)
        for g, (avg0, src) in enumerate(sources):
            group = first._groups[g]
            group_flag = flag if flag is None or flag.device == group.device else flag.to(group.device)
            flat = avg0 is group.avg.storages  # a flattened model pairs storage by storage
            avgs = [e._groups[g].avg.storages if flat else e._groups[g].avg for e in engines]
            ema_multi_(avgs, src, weights, found_inf=group_flag)
            live = first._local(tensors, group.copied) if group.copied else []
            for e in engines:
                eg = e._groups[g]
                for dst, tensor in zip(eg.latest.views, live):
                    src_t = tensor.to(eg.device)
                    dst.copy_(src_t if group_flag is None else torch.where(group_flag != 0, dst, src_t))
                if group_flag is None:
                    eg.counts.add_(1)
                else:
                    eg.counts.sub_((group_flag != 0).to(torch.int64)).add_(1)
        for e in engines:
            if flag is not None:
                e.skipped_tensor.add_((flag != 0).to(device=e.skipped_tensor.device, dtype=torch.int64))
            e.attempts[0] += 1
            e._tokens = [e._next_token]
            e._next_token += 1

    def _bound_multi(self, avgs: List[Any], src: Any) -> BoundLists:
        """(K averages, source) bound once in C++ for :meth:`ema_multi`, rebound when any of the objects
        changes (the source list is rebuilt whenever the model's structure changes, so a binding never
        goes stale). Kept apart from :meth:`_bound`'s cache so the two never evict each other."""
        cache = self.__dict__.setdefault("_bound_multi_cache", {})
        key = (*map(id, avgs), id(src))
        cached = cache.get(key)
        if cached is None or cached[1] is not src or any(a is not b for a, b in zip(cached[0], avgs)):
            if len(cache) >= 4:  # sharded models rebuild their source list every call
                cache.clear()
            cached = cache[key] = (list(avgs), src, BoundLists(*avgs, src))
        return cached[2]

    # ------------------------------------------------------------------------ swapping
    @property
    def is_swapped(self) -> bool:
        """Whether the average is swapped into the model (see :meth:`swap_in`, :meth:`swapped`)."""
        return self._stash is not None

    def _indices(self, segments: Optional[Sequence[int]]) -> List[int]:
        if segments is None:
            return list(range(len(self.source.names)))
        chosen = set(segments)
        return [i for i, s in enumerate(self.segment_of) if s in chosen]

    @torch.no_grad()
    def swap_in(self, segments: Optional[Sequence[int]] = None) -> None:
        """Save the model tensors (of ``segments``), then write their average (cast to the model's dtypes) in."""
        if self._stash is not None:
            raise RuntimeError(f"{self.what}: the average is already swapped into the model")
        indices = self._indices(segments)
        tensors = self._current()
        live = self._local(tensors, indices)
        average = [self._view_of[i] for i in indices]
        self._stash = FlatBuffer.from_tensors(live)
        self._stash_indices = indices
        try:
            if live:
                torch._foreach_copy_(live, average)
        except BaseException:
            self.swap_out()
            raise

    @torch.no_grad()
    def swap_out(self) -> None:
        """Restore the model tensors saved by :meth:`swap_in`, bit for bit."""
        if self._stash is None:
            raise RuntimeError(f"{self.what}: the average is not swapped into the model")
        if self.source.fsdp:
            reshard_fsdp(self.source.fsdp)
        live = self._local(self._current(), self._stash_indices)
        if live:
            torch._foreach_copy_(live, self._stash.views)
        self._stash = None
        self._stash_indices = []

    @contextlib.contextmanager
    def swapped(self, segments: Optional[Sequence[int]] = None) -> Iterator[None]:
        self.swap_in(segments)
        try:
            yield
        finally:
            self.swap_out()

    # ---------------------------------------------------------------------- state dicts
    def average_state_dict(self, segments: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """Name -> average (views into the live storage; DTensors laid out like sharded model tensors)."""
        tensors = self.source.tensors()
        names = self.source.names
        if self._plain:
            return {names[i]: self._view_of[i] for i in self._indices(segments)}
        return {names[i]: model_layout(self._view_of[i], tensors[i]) for i in self._indices(segments)}

    def check_average(self, what: str, average: Any, segments: Optional[Sequence[int]] = None) -> None:
        """TypeError/ValueError unless ``average`` maps exactly the names of ``segments`` to tensors of
        the averaged shapes (sharded ones on the same meshes); touches nothing."""
        if not isinstance(average, Mapping):
            raise TypeError(f"{what}: 'average' must be a mapping, got {type(average).__name__}")
        for name, tensor in average.items():
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{what}: average[{name!r}] is a {type(tensor).__name__}, not a Tensor")
        self.check_names_and_shapes(what, {n: t.shape for n, t in average.items()}, segments)
        tensors = self.source.tensors()
        check_meshes(what, {self.source.names[i]: (average[self.source.names[i]], tensors[i])
                            for i in self._indices(segments)})

    def check_names_and_shapes(self, what: str, shapes: Mapping[str, torch.Size],
                               segments: Optional[Sequence[int]] = None) -> None:
        indices = self._indices(segments)
        names = [self.source.names[i] for i in indices]
        missing = [n for n in names if n not in shapes]
        unexpected = [n for n in shapes if n not in set(names)]
        if missing or unexpected:
            raise ValueError(f"{what}: names do not match the averaged tensors; missing: {missing}, "
                             f"unexpected: {unexpected}")
        tensors = self.source.tensors()
        for i in indices:
            name = self.source.names[i]
            expected = tuple(tensors[i].shape)
            if tuple(shapes[name]) != expected:
                raise ValueError(f"{what}: {name!r} has shape {tuple(shapes[name])}, the average has {expected}")

    @torch.no_grad()
    def load_average(self, average: Mapping[str, Tensor], segments: Optional[Sequence[int]] = None) -> None:
        """Copy ``average`` (checked with :meth:`check_average` first) into the storage."""
        if self._stash is not None:
            raise RuntimeError(f"{self.what}: the average is swapped into the model; swap it back first")
        tensors = self.source.tensors()
        for i in self._indices(segments):
            self._view_of[i].copy_(part_for(average[self.source.names[i]], tensors[i]))

    @torch.no_grad()
    def load_second_moment(self, values: Mapping[str, Tensor]) -> None:
        """Copy name -> mean of squares into the storage (names and shapes as :meth:`second_moment_state_dict`)."""
        for name, view in self.second_moment_state_dict().items():
            view.copy_(values[name])

    @torch.no_grad()
    def set_counters(self, counts: Sequence[Union[int, Tensor]], attempts: Sequence[int],
                     skipped: Optional[Union[int, Tensor]] = None) -> None:
        """Restore the per-segment counters (device counts, host attempts) and the skipped count."""
        if len(counts) != self.n_segments or len(attempts) != self.n_segments:
            raise ValueError(f"{self.what}: expected {self.n_segments} counters")
        values = torch.stack([torch.as_tensor(c, dtype=torch.int64).reshape(()).cpu() for c in counts])
        for group in self._groups:
            group.counts.copy_(values)
        self.attempts = [int(a) for a in attempts]
        self._fast = None
        host = values.tolist()  # loading is not a hot path: one read groups equal counts
        tokens: Dict[Tuple[int, int], int] = {}
        for s in range(self.n_segments):
            key = (host[s], self.attempts[s])
            if key not in tokens:
                tokens[key] = self._next_token
                self._next_token += 1
            self._tokens[s] = tokens[key]
        if skipped is not None:
            self.skipped_tensor.copy_(torch.as_tensor(skipped))

    # -------------------------------------------------------------------------- growing
    def extend(self, named: Sequence[Tuple[str, Tensor]], segment: int) -> "AveragingEngine":
        """A new engine over these tensors plus ``named`` (in a new ``segment``), carrying this one's state.

        Only for engines over fixed tensors (optimizer params)."""
        if not isinstance(self.source, _FixedTensors):
            raise TypeError(f"{self.what}: only an engine over fixed tensors can grow")
        if self._stash is not None:
            raise RuntimeError(f"{self.what}: the average is swapped into the model; swap it back first")
        old_named = list(zip(self.source.names, self.source.tensors()))
        dtype = self.dtype + (None,) * len(named) if isinstance(self.dtype, tuple) else self.dtype
        grown = AveragingEngine(old_named + list(named), dtype=dtype, device=self.device,
                                skip_nonfinite=self.skip_nonfinite,
                                segments=self.segment_of + [segment] * len(named), what=self.what)
        with torch.no_grad():
            for i in range(len(old_named)):
                grown._view_of[i].copy_(self._view_of[i])
            for new, old in zip(grown._groups, self._groups):
                if new.device == old.device:
                    new.counts[:self.n_segments].copy_(old.counts)
        grown.attempts[:self.n_segments] = self.attempts
        grown._tokens[:self.n_segments] = self._tokens
        grown._next_token = max(self._next_token, max(self._tokens) + 1)
        for s in range(self.n_segments, grown.n_segments):
            grown._tokens[s] = grown._next_token
            grown._next_token += 1
        grown.skipped_tensor.copy_(self.skipped_tensor)
        return grown


# ------------------------------------------------------------------------ flat model parameters
import weakref as _weakref  # noqa: E402

_FLAT_HANDLES: "_weakref.WeakKeyDictionary[nn.Module, FlatParameters]" = _weakref.WeakKeyDictionary()


def _storage_refs(tensor: Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1  # minus the temporary


class FlatParameters:
    """What :func:`flatten_parameters` returns: the model's parameters as views of one flat storage per
    (device, dtype).

    ``buffer`` is a :class:`~swm_fused.FlatBuffer` whose views *are* the parameters' data, in
    ``model.parameters()`` order. :meth:`intact` says, in O(1), whether every parameter still lives
    there; ``model.to(...)``, ``load_state_dict(assign=True)`` or ``p.data = ...`` move parameters
    out, after which averagers fall back to per-tensor lists (correct, slower) until you call
    :func:`flatten_parameters` again.
    """

    def __init__(self, model: nn.Module, params: List[nn.Parameter], buffer: FlatBuffer):
        self._model = _weakref.ref(model)
        self.params = params
        self.buffer = buffer
        counts = [0] * len(buffer.storages)
        for g in buffer.group_of:
            counts[g] += 1
        # each storage is referenced by the storage tensor, the buffer's views and the parameters
        self._expected = [1 + 2 * n for n in counts]
        self._epoch = structure_epoch()

    def intact(self) -> bool:
        """Whether every parameter still lives in the flat storage (O(1): storage reference counts and the
        module structure epoch). False also when something else holds extra views of the storage."""
        if _EPOCH[0] != self._epoch:
            model = self._model()
            if model is None or [p for p in model.parameters()] != self.params:
                return False
            self._epoch = _EPOCH[0]
        return all(_storage_refs(s) == n for s, n in zip(self.buffer.storages, self._expected))

    def __repr__(self) -> str:
        return f"FlatParameters({len(self.params)} parameters, {self.buffer!r}, intact={self.intact()})"


@torch.no_grad()
def flatten_parameters(model: nn.Module) -> FlatParameters:
    """Lay ``model``'s parameters out in one contiguous storage per (device, dtype); each becomes a view.

    The Parameter objects stay the same (optimizers, hooks and ``state_dict`` keys keep working;
    only ``.data`` moves), so EMA/SWA of the model by :class:`~swm_fused.WeightAverager` or
    :class:`AveragingEngine` becomes one fused kernel over one vector per storage, whatever the
    number of tensors. Call it after moving the model to its device and dtype, before building
    optimizers' fused state is not required (their state is per parameter). Calling it again
    re-flattens (e.g. after ``model.to(dtype)``).

    Not for FSDP2 (``fully_shard``) or DTensor parameters: FSDP2 owns its own flat parameters
    (TypeError). ``torch.save`` of a single parameter saves the whole storage; a full
    ``state_dict()`` saves each storage once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"flatten_parameters: model must be an nn.Module, got {type(model).__name__}")
    if fsdp_modules(model):
        raise TypeError("flatten_parameters: FSDP2 (fully_shard) modules manage their own flat parameters; "
                        "average them with WeightAverager(model) directly")
    params = list(model.parameters())
    if any(local_shard(p) is not p for p in params):
        raise TypeError("flatten_parameters: DTensor (sharded) parameters cannot be flattened")
    if not params:
        raise ValueError("flatten_parameters: the model has no parameters")
    buffer = FlatBuffer.from_tensors([p.detach() for p in params])
    for p, view in zip(params, buffer.views):
        p.data = view
    handle = FlatParameters(model, params, buffer)
    _FLAT_HANDLES[model] = handle
    return handle


def flat_parameters_of(model: Any) -> Optional[FlatParameters]:
    """The :class:`FlatParameters` of the last :func:`flatten_parameters` call on ``model``, if any."""
    if not isinstance(model, nn.Module):
        return None
    return _FLAT_HANDLES.get(model)
