"""Drop-in replacement for :mod:`torch.optim.swa_utils` whose averaging runs on the fused ops.

Change ``from torch.optim.swa_utils import AveragedModel, SWALR, update_bn`` to
``from swm_fused.swa_utils import AveragedModel, SWALR, update_bn``: names,
signatures, ``state_dict`` layout and results are torch's, within float rounding.
The differences are all backwards compatible:

- **No host-device sync per update.** torch reads ``n_averaged`` on the host at
  every update; here a Python flag remembers whether the first update (a copy) has
  happened, and SWA reads ``n_averaged`` on the device.
- **Fused default paths.** Plain SWA (no ``avg_fn``/``multi_avg_fn``) and the
  functions from :func:`get_ema_multi_avg_fn` / :func:`get_swa_multi_avg_fn` run
  as one :func:`swm_fused.swa_` / :func:`swm_fused.ema_` call per device, mixed
  dtypes included. Your own ``avg_fn`` / ``multi_avg_fn`` are called as torch calls them.
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
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import ops
from .distributed import fsdp_modules, local_shard, reshard_fsdp

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
        layouts = [(getattr(t, "placements", None), tuple(local_shard(t).shape)) for t in (src, avg)]
        if layouts[0] != layouts[1]:
            raise ValueError(f"AveragedModel.update_parameters: {kind} '{name}' is sharded differently: (placements, "
                             f"local shape) {layouts[0]} in the model but {layouts[1]} in the average")
        pairs.append((local_shard(avg.detach()), local_shard(src.detach())))
    if by_name:
        raise ValueError(f"AveragedModel.update_parameters: the model passed in has {kind} "
                         f"'{next(iter(by_name))}' that the average does not have")
    return pairs


_DEFAULT_SWA = _FusedMultiAvgFn()


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
    parameter or buffer (torch puts it on the CPU when ``device`` is None), so the
    update never waits on the host. The "first update is a copy" decision is kept
    on the host and re-read from ``n_averaged`` once after ``load_state_dict``;
    if you overwrite ``n_averaged`` in place yourself, call ``load_state_dict``
    with the new value instead so it is seen.
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
        # True/False: whether the first update (the copy) has happened; None: unknown, read n_averaged.
        self._first_update_done: Optional[bool] = False

    def forward(self, *args, **kwargs):
        """Run the averaged model."""
        return self.module(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._first_update_done = None  # n_averaged may have changed; read it once at the next update

    def update_parameters(self, model: Module) -> None:
        """Fold ``model``'s current parameters (and buffers, with ``use_buffers``) into the average.

        Raises ``ValueError`` naming the parameter or buffer when ``model`` does
        not match the average by name and shape; nothing is written in that case.
        """
        ours, theirs = _unwrap(self.module), _unwrap(model)
        # FSDP2 may hold unsharded parameters after a forward; averaging works on the shards
        reshard_fsdp(fsdp_modules(ours) + fsdp_modules(theirs))
        averaged = _pair_by_name("parameter", list(ours.named_parameters()), list(theirs.named_parameters()))
        buffers = _pair_by_name("buffer", list(ours.named_buffers()), list(theirs.named_buffers()))
        if self.use_buffers:
            averaged, synced = averaged + buffers, []
        else:
            synced = buffers

        if self._first_update_done is None:
            self._first_update_done = bool(self.n_averaged != 0)  # one read after a load, not per update
        # Every tensor here is detached, so no autograd mode is needed (torch sets none either).
        if self._first_update_done:
            self._average(averaged)
        else:
            for avg, src in averaged:
                avg.copy_(src)
        for avg, src in synced:
            avg.copy_(src)
        self.n_averaged += 1
        self._first_update_done = True

    def _average(self, pairs: List[Tuple[Tensor, Tensor]]) -> None:
        if self.avg_fn is not None:
            for avg, src in pairs:
                avg.copy_(self.avg_fn(avg, self._as_user_input(src, avg), self.n_averaged.to(avg.device)))
            return
        fn = self.multi_avg_fn if self.multi_avg_fn is not None else _DEFAULT_SWA
        if isinstance(fn, _FusedMultiAvgFn):
            by_device: Dict[torch.device, Tuple[List[Tensor], List[Tensor]]] = {}
            for avg, src in pairs:
                avgs, srcs = by_device.setdefault(avg.device, ([], []))
                avgs.append(avg)
                srcs.append(src.to(avg.device))
            for device, (avgs, srcs) in by_device.items():
                fn(avgs, srcs, self.n_averaged.to(device))
            return
        grouped = _group_tensors_by_device_and_dtype(
            [[avg for avg, _ in pairs], [self._as_user_input(src, avg) for avg, src in pairs]])
        for (device, _), ([avgs, srcs], _) in grouped.items():
            fn(avgs, srcs, self.n_averaged.to(device))

    def _as_user_input(self, src: Tensor, avg: Tensor) -> Tensor:
        """The model tensor as torch hands it to a user's function: on the average's device,
        and in the average's dtype when ``dtype=`` chose one."""
        if self.average_dtype is not None and avg.is_floating_point():
            return src.to(device=avg.device, dtype=avg.dtype)
        return src.to(avg.device)
