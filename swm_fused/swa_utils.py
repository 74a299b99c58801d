"""Drop-in replacement for :mod:`torch.optim.swa_utils` whose averaging runs on the fused ops.

Change ``from torch.optim.swa_utils import AveragedModel, SWALR, update_bn`` to
``from swm_fused.swa_utils import AveragedModel, SWALR, update_bn``: names,
signatures, ``state_dict`` layout and results are torch's, within float rounding.
The differences are all backwards compatible:

- **No host-device sync per update on a GPU.** torch reads ``n_averaged`` on the host
  at every update. Here the first update's copy is decided from ``n_averaged`` itself:
  on the CPU by reading it (free there), on a GPU on the device (SWA's weight
  ``1 / (n + 1)`` is 1 at ``n == 0``; EMA runs its blend and its copy each masked by
  ``n`` through ``found_inf``). So ``n_averaged.fill_(0)`` restarts the average and
  loading ``state_dict()`` tensors in place continues it, as in torch.
- **Bit for bit on the CPU.** The default SWA on the CPU computes torch's
  ``avg + (cur - avg) / (n + 1)`` with the same three roundings; EMA
  (``get_ema_multi_avg_fn``) and ``get_swa_multi_avg_fn`` compute torch's lerp.
- **Paired once.** Parameters are paired by name at the first update with a model
  and re-paired only when a module registers a new parameter, buffer or submodule.
- **Fused paths.** On a GPU, and on the CPU with ``dtype=``, the default SWA and the
  functions from :func:`get_ema_multi_avg_fn` / :func:`get_swa_multi_avg_fn` run as one
  :func:`swm_fused.swa_` / :func:`swm_fused.ema_` call per device, mixed dtypes included.
  On the CPU without ``dtype=`` they run torch's own ``_foreach`` arithmetic (bit for
  bit), once per update instead of per (device, dtype) group after a Python walk. Your own ``avg_fn`` / ``multi_avg_fn`` are called as torch calls them.
- **Higher-precision averages.** ``AveragedModel(model, dtype=torch.float32)``
  keeps an fp32 average of a bf16 model, with no per-update cast of the model.
- **Pairing by name.** Parameters and buffers are matched by name (through
  ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers); a
  missing, extra or reshaped one raises ``ValueError`` naming it, before anything
  is written. torch pairs by position and silently stops at the shorter list.
- **Picklable averaging functions.** The ``get_*_fn`` helpers return picklable objects.
- **Sharded parameters.** With DTensor parameters (FSDP2, tensor parallel) each
  rank averages its local shards, with no communication per update.

:class:`SWALR` and :func:`update_bn` are torch's own, re-exported: nothing about
them needs to change.
"""
from __future__ import annotations

import sys
from copy import deepcopy
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim.swa_utils import SWALR, update_bn
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _group_tensors_by_device_and_dtype

from . import ops
from .distributed import fsdp_modules, local_shard, reshard_fsdp
from .engine import ModuleTensors

__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
]

ParamList = Union[List[Tensor], Tuple[Tensor, ...]]
AvgFn = Callable[[Tensor, Tensor, Union[Tensor, int]], Tensor]
MultiAvgFn = Callable[[ParamList, ParamList, Union[Tensor, int]], None]


def _check_decay(decay: float) -> None:
    if decay < 0.0 or decay > 1.0:  # torch's check and message, word for word
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


class _FusedMultiAvgFn:
    """EMA (``decay`` given) or SWA (``decay`` None) over lists of tensors, as one fused op.

    Averages the ops can store (float32/64, bfloat16, float16) go through
    :func:`swm_fused.ema_` / :func:`swm_fused.swa_` in one call; the rest (integer
    buffers such as BatchNorm's ``num_batches_tracked``, complex) follow torch's
    per-tensor formula.
    """

    def __init__(self, decay: Optional[float] = None):
        self.decay = decay

    def __call__(self, averaged_param_list: ParamList, current_param_list: ParamList,
                 num_averaged: Union[Tensor, int]) -> None:
        if len(averaged_param_list) != len(current_param_list):
            raise ValueError(f"{self!r}: {len(averaged_param_list)} averaged tensors but "
                             f"{len(current_param_list)} current tensors")
        fused_avg: List[Tensor] = []
        fused_src: List[Tensor] = []
        with torch.no_grad():
            for avg, src in zip(averaged_param_list, current_param_list):
                if avg.dtype in ops.AVERAGE_DTYPES and src.is_floating_point():
                    fused_avg.append(avg)
                    fused_src.append(src)
                elif self.decay is None:
                    avg.copy_(avg + (src - avg) / (num_averaged + 1))
                else:
                    avg.copy_(avg * self.decay + src * (1 - self.decay))
            if not fused_avg:
                return
            if self.decay is None:
                ops.swa_(fused_avg, fused_src, num_averaged)
            else:
                ops.ema_(fused_avg, fused_src, self.decay)

    def __repr__(self) -> str:
        return "swa_multi_avg_fn()" if self.decay is None else f"ema_multi_avg_fn(decay={self.decay})"


class _EMAAvgFn:
    def __init__(self, decay: float):
        self.decay = decay

    @torch.no_grad()
    def __call__(self, ema_param: Tensor, current_param: Tensor, num_averaged: Union[Tensor, int]) -> Tensor:
        return self.decay * ema_param + (1 - self.decay) * current_param

    def __repr__(self) -> str:
        return f"ema_avg_fn(decay={self.decay})"


class _SWAAvgFn:
    @torch.no_grad()
    def __call__(self, averaged_param: Tensor, current_param: Tensor, num_averaged: Union[Tensor, int]) -> Tensor:
        return averaged_param + (current_param - averaged_param) / (num_averaged + 1)

    def __repr__(self) -> str:
        return "swa_avg_fn()"


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """EMA over lists of tensors, in place: ``avg = decay * avg + (1 - decay) * current``.

    Like torch's, but :class:`AveragedModel` runs it as one fused
    :func:`swm_fused.ema_` per device, and the returned object pickles.
    ``decay`` must lie in [0, 1] (``ValueError`` otherwise, as in torch).
    """
    _check_decay(decay)
    return _FusedMultiAvgFn(decay)


def get_swa_multi_avg_fn() -> MultiAvgFn:
    """Equal-weight running mean over lists of tensors, in place, through :func:`swm_fused.swa_`.

    ``avg += (current - avg) / (num_averaged + 1)``; ``num_averaged`` may be an
    int or a one-element tensor on the tensors' device (no host sync).
    """
    return _FusedMultiAvgFn()


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    """Per-tensor EMA, torch's formula exactly: returns ``decay * avg + (1 - decay) * current``."""
    _check_decay(decay)
    return _EMAAvgFn(decay)


def get_swa_avg_fn() -> AvgFn:
    """Per-tensor SWA, torch's formula exactly: returns ``avg + (current - avg) / (num_averaged + 1)``."""
    return _SWAAvgFn()


def _unwrap(module: Module) -> Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
            continue
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # only loaded if torch.compile was used
        if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
            module = module._orig_mod
            continue
        return module


def _pair_by_name(kind: str, averaged: Sequence[Tuple[str, Tensor]],
                  current: Sequence[Tuple[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
    """(average, model) tensors, detached, matched by name; ValueError names any mismatch.

    DTensors (sharded parameters) are paired by their local shards, which must match too.
    """
    by_name: Dict[str, Tensor] = dict(current)
    pairs = []
    for name, avg in averaged:
        src = by_name.pop(name, None)
        if src is None:
            raise ValueError(f"AveragedModel.update_parameters: the average has {kind} '{name}' "
                             f"but the model passed in has no {kind} of that name")
        if src.shape != avg.shape:
            raise ValueError(f"AveragedModel.update_parameters: {kind} '{name}' has shape "
                             f"{tuple(src.shape)} in the model but {tuple(avg.shape)} in the average")
        layouts = [(getattr(t, "placements", None), tuple(local_shard(t).shape)) for t in (src, avg)]  # noqa
        if layouts[0] != layouts[1]:
            raise ValueError(f"AveragedModel.update_parameters: {kind} '{name}' is sharded differently: (placements, "
                             f"local shape) {layouts[0]} in the model but {layouts[1]} in the average")
        pairs.append((avg, src))  # the tensors themselves: a later `.data =` (model.to) is seen
    if by_name:
        raise ValueError(f"AveragedModel.update_parameters: the model passed in has {kind} "
                         f"'{next(iter(by_name))}' that the average does not have")
    return pairs


class AveragedModel(Module):
    r"""Running average (SWA or EMA) of a model's parameters, a drop-in for torch's ``AveragedModel``.

    Keeps a deep copy of ``model`` (on ``device`` when given) in ``self.module``
    and a long buffer ``n_averaged`` counting the models averaged so far; the
    ``state_dict`` holds ``module.*`` and ``n_averaged`` exactly as torch's does.
    The first :meth:`update_parameters` copies the model; later ones average.

    Args:
        model: the model to average.
        device: where the average lives (default: where the model's copy lands).
        avg_fn: ``avg_fn(averaged, current, n_averaged) -> Tensor``, applied per
            tensor exactly as torch does. Default: equal-weight average (SWA).
        multi_avg_fn: ``multi_avg_fn(averaged_list, current_list, n_averaged)``,
            in place. Those from :func:`get_ema_multi_avg_fn` and
            :func:`get_swa_multi_avg_fn` run fused, one call per device; any other
            callable is called per (device, dtype) group exactly as torch does.
        use_buffers: average the buffers too. When False, buffers are copied
            from the model at every update (as in torch).
        dtype: keyword-only; the floating dtype of the average (e.g.
            ``torch.float32`` for a bf16 model). The copy's floating parameters and
            buffers are cast to it, so its ``forward`` runs in this dtype. Your own
            ``avg_fn``/``multi_avg_fn`` then receive the model's tensors cast to it.
            Kept as ``self.average_dtype``.

    Sharded models: a model whose parameters are DTensors (e.g. tensor parallel)
    is deep-copied with its shards, and each rank averages its local shards; your
    own ``avg_fn``/``multi_avg_fn`` then receive the local shards. FSDP2 modules
    cannot be deep-copied, so build the average before sharding and shard its copy
    the same way::

        averaged = AveragedModel(model, dtype=torch.float32)
        fully_shard(model, mesh=mesh)
        fully_shard(averaged.module, mesh=mesh)

    ``n_averaged`` lives on ``device``, or on the device of the model copy's first
    parameter or buffer (torch puts it on the CPU when ``device`` is None), so a GPU
    update never waits on the host. Whether an update copies is decided from
    ``n_averaged`` at every update (0: copy), as torch does.
    """

    n_averaged: Tensor

    def __init__(self, model: Module, device: Optional[Union[int, str, torch.device]] = None,
                 avg_fn: Optional[AvgFn] = None, multi_avg_fn: Optional[MultiAvgFn] = None,
                 use_buffers: bool = False, *, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        if dtype is not None and dtype not in ops.AVERAGE_DTYPES:
            raise TypeError(f"AveragedModel: dtype must be torch.float32, float64, bfloat16, float16 "
                            f"or None, got {dtype}")
        if fsdp_modules(model):
            raise TypeError("AveragedModel: FSDP2 (fully_shard) modules cannot be deep-copied; build "
                            "AveragedModel(model) before fully_shard(model), then fully_shard(averaged.module) "
                            "the same way, or use swm_fused.WeightAverager(model)")
        self.module = deepcopy(model)
        if device is not None or dtype is not None:
            self.module = self.module.to(device=device, dtype=dtype)
        if device is None:
            first = next(iter(self.module.parameters()), None)
            if first is None:
                first = next(iter(self.module.buffers()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.average_dtype = dtype
        self._pairing: Optional[_Pairing] = None

    def forward(self, *args, **kwargs):
        """Run the averaged model."""
        return self.module(*args, **kwargs)

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        state["_pairing"] = None  # holds the last model passed in: never pickled or copied along
        return state

    def _pairing_for(self, model: Module) -> "_Pairing":
        pairing = self._pairing
        if pairing is None or not pairing.valid_for(self.module, model, self.use_buffers):
            pairing = _Pairing(self.module, model, self.use_buffers)
            self._pairing = pairing
        return pairing

    @torch.no_grad()
    def update_parameters(self, model: Module) -> None:
        """Fold ``model``'s current parameters (and buffers, with ``use_buffers``) into the average.

        Raises ``ValueError`` naming the parameter or buffer when ``model`` does
        not match the average by name and shape; nothing is written in that case.
        The pairing is cached: the next update with the same model checks an integer
        and a few dict lookups instead of walking both modules.
        """
        pairing = self._pairing_for(model)
        averaged, synced = pairing.lists()
        if self.avg_fn is not None or not (self.multi_avg_fn is None or isinstance(self.multi_avg_fn, _FusedMultiAvgFn)):
            copy = bool(self.n_averaged == 0)  # a user function: decided on the host, as torch does
            if copy:
                _copy_pairs(averaged)
            else:
                self._average_with_user_fn(averaged)
        else:
            self._average_fused(pairing, averaged)
        for device, (avgs, srcs) in _by_device(synced).items():
            torch._foreach_copy_(avgs, [s.to(device) for s in srcs])
        self.n_averaged.add_(1)

    def _average_fused(self, pairing: "_Pairing", averaged: List[Tuple[Tensor, Tensor]]) -> None:
        fn = self.multi_avg_fn if self.multi_avg_fn is not None else None
        decay = fn.decay if isinstance(fn, _FusedMultiAvgFn) else None
        for device, (avgs, srcs) in pairing.groups(averaged).items():
            n = self.n_averaged if self.n_averaged.device == device else self.n_averaged.to(device)
            fused = [(a, s) for a, s in zip(avgs, srcs) if a.dtype in ops.AVERAGE_DTYPES and s.is_floating_point()]
            other = [(a, s) for a, s in zip(avgs, srcs) if not (a.dtype in ops.AVERAGE_DTYPES and s.is_floating_point())]
            f_avg, f_src = [a for a, _ in fused], [s for _, s in fused]
            on_host = device.type == "cpu"
            if on_host:
                if int(n) == 0:  # reading a CPU tensor is free: the copy is exact, as torch's
                    _copy_pairs(list(zip(avgs, srcs)))
                    continue
                same = all(a.dtype == s_.dtype for a, s_ in fused)
                if not f_avg:
                    pass
                elif same and decay is not None:
                    torch._foreach_lerp_(f_avg, f_src, 1 - decay)  # torch's get_ema_multi_avg_fn, exactly
                elif same and fn is None and device.type not in _get_foreach_kernels_supported_devices():
                    _torch_swa_formula(f_avg, f_src, n)  # torch's default avg_fn, the same roundings
                elif same:
                    torch._foreach_lerp_(f_avg, f_src, 1 / (n + 1))  # torch's get_swa_multi_avg_fn, exactly
                elif decay is not None:
                    ops.ema_(f_avg, f_src, decay)  # dtype= chose another dtype: fused, mixed precision
                else:
                    ops.swa_(f_avg, f_src, n)
                for avg, src in other:
                    avg.copy_(_other_average(avg, src, n, decay))
                continue
            # On a GPU: no host read. SWA's weight 1 / (n + 1) is 1 at n == 0 (a copy); EMA runs its
            # blend masked by n == 0 and its copy masked by n != 0.
            first = (n == 0).to(torch.float32)
            if f_avg:
                if decay is None:
                    ops.swa_(f_avg, f_src, n)
                else:
                    ops.ema_(f_avg, f_src, decay, found_inf=first)
                    ops.swa_(f_avg, f_src, 0, found_inf=1.0 - first)
            for avg, src in other:
                avg.copy_(torch.where(n == 0, src.to(avg.dtype), _other_average(avg, src, n, decay)))

    def _average_with_user_fn(self, pairs: List[Tuple[Tensor, Tensor]]) -> None:
        if self.avg_fn is not None:
            for avg, src in pairs:
                avg.copy_(self.avg_fn(avg.detach(), self._as_user_input(src, avg), self.n_averaged.to(avg.device)))
            return
        grouped = _group_tensors_by_device_and_dtype(
            [[avg.detach() for avg, _ in pairs], [self._as_user_input(src, avg) for avg, src in pairs]])
        for (device, _), ([avgs, srcs], _) in grouped.items():
            self.multi_avg_fn(avgs, srcs, self.n_averaged.to(device))

    def _as_user_input(self, src: Tensor, avg: Tensor) -> Tensor:
        """The model tensor as torch hands it to a user's function: detached, on the average's device,
        and in the average's dtype when ``dtype=`` chose one."""
        src = src.detach()
        if self.average_dtype is not None and avg.is_floating_point():
            return src.to(device=avg.device, dtype=avg.dtype)
        return src.to(avg.device)


def _copy_pairs(pairs: Sequence[Tuple[Tensor, Tensor]]) -> None:
    for device, (avgs, srcs) in _by_device(pairs).items():
        if avgs:
            torch._foreach_copy_(avgs, [s.to(device) for s in srcs])


def _by_device(pairs: Sequence[Tuple[Tensor, Tensor]]) -> Dict[torch.device, Tuple[List[Tensor], List[Tensor]]]:
    out: Dict[torch.device, Tuple[List[Tensor], List[Tensor]]] = {}
    for avg, src in pairs:
        avgs, srcs = out.setdefault(avg.device, ([], []))
        avgs.append(avg)
        srcs.append(src)
    return out


def _other_average(avg: Tensor, src: Tensor, n: Tensor, decay: Optional[float]) -> Tensor:
    """torch's per-tensor formulas, for tensors the fused ops do not store (integer buffers)."""
    src = src.to(avg.device)
    if decay is None:
        return avg + (src - avg) / (n + 1)
    return avg * decay + src * (1 - decay)


_CHUNK_ELEMENTS = 1 << 22  # bounds the temporary of the exact CPU formula (16 MB of fp32)


def _torch_swa_formula(avgs: List[Tensor], srcs: List[Tensor], n: Tensor) -> None:
    """``avg += (src - avg) / (n + 1)`` with torch's roundings (its default CPU path), in chunks of tensors
    so the temporary stays small."""
    divisor = n + 1
    start = 0
    while start < len(avgs):
        stop, size = start, 0
        while stop < len(avgs) and (stop == start or size + avgs[stop].numel() <= _CHUNK_ELEMENTS):
            size += avgs[stop].numel()
            stop += 1
        diff = torch._foreach_sub(srcs[start:stop], avgs[start:stop])
        torch._foreach_div_(diff, divisor)
        torch._foreach_add_(avgs[start:stop], diff)
        start = stop


class _Pairing:
    """The (average, model) tensor pairs of one AveragedModel and one model, built once by name.

    Valid while neither module's structure changed (:class:`~swm_fused.engine.ModuleTensors`'
    O(1) check) and the same model object is passed in.
    """

    def __init__(self, ours_root: Module, model: Module, use_buffers: bool):
        import weakref

        ours, theirs = _unwrap(ours_root), _unwrap(model)
        self._ours_root = ours_root
        self._model_ref = weakref.ref(model)
        self.use_buffers = use_buffers
        self.ours = ModuleTensors(ours, include_buffers=True, what="AveragedModel: the average")
        self.theirs = ModuleTensors(theirs, include_buffers=True, what="AveragedModel.update_parameters: model")
        n_ours_params = sum(1 for _ in ours.named_parameters())
        n_theirs_params = sum(1 for _ in theirs.named_parameters())
        ours_named = list(zip(self.ours.names, self.ours.tensors()))
        theirs_named = list(zip(self.theirs.names, self.theirs.tensors()))
        params = _pair_by_name("parameter", ours_named[:n_ours_params], theirs_named[:n_theirs_params])
        buffers = _pair_by_name("buffer", ours_named[n_ours_params:], theirs_named[n_theirs_params:])
        self._averaged = params + buffers if use_buffers else params
        self._synced = [] if use_buffers else buffers
        self._sharded = self.ours.has_dtensor or self.theirs.has_dtensor
        self._groups: Optional[Dict[torch.device, Tuple[List[Tensor], List[Tensor]]]] = None
        self._ours_ref = weakref.ref(ours)

    def valid_for(self, ours_root: Module, model: Module, use_buffers: bool) -> bool:
        return (ours_root is self._ours_root and self._model_ref() is model and use_buffers == self.use_buffers
                and not self.ours.changed() and not self.theirs.changed())

    def lists(self) -> Tuple[List[Tuple[Tensor, Tensor]], List[Tuple[Tensor, Tensor]]]:
        """(averaged pairs, synced pairs); DTensors are read through their local shards at every call."""
        if self.ours.fsdp or self.theirs.fsdp:
            reshard_fsdp(self.ours.fsdp + self.theirs.fsdp)
        if not self._sharded:
            return self._averaged, self._synced
        return ([(local_shard(a), local_shard(s)) for a, s in self._averaged],
                [(local_shard(a), local_shard(s)) for a, s in self._synced])

    def groups(self, averaged: List[Tuple[Tensor, Tensor]]) -> Dict[torch.device, Tuple[List[Tensor], List[Tensor]]]:
        """Averaged pairs by the average's device, model tensors moved there (cached when unsharded
        and already there)."""
        if self._groups is not None and not self._sharded:
            return self._groups
        out: Dict[torch.device, Tuple[List[Tensor], List[Tensor]]] = {}
        moved = False
        for avg, src in averaged:
            avgs, srcs = out.setdefault(avg.device, ([], []))
            avgs.append(avg)
            if src.device != avg.device:
                moved = True
                src = src.to(avg.device)
            srcs.append(src)
        if not moved and not self._sharded:
            self._groups = out
        return out
