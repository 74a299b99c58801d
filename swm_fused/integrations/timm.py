"""timm's ``ModelEmaV3`` on the fused engine: change one import, keep the arguments and the checkpoints.

::

    # from timm.utils import ModelEmaV3
    from swm_fused.integrations.timm import ModelEmaV3

    model_ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
    ...
    model_ema.update(model, step=num_updates)
    validate(model_ema.module, loader)            # or model_ema(x)
    torch.save({"state_dict_ema": model_ema.module.state_dict()}, path)

How it works: ``.module`` is a deep copy of the model, as in timm, but each of its averaged
tensors is a view into the :class:`~swm_fused.engine.AveragingEngine`'s flat storage. An
``update`` is one fused ``ema_`` pass of the engine (one kernel per storage on one device), and
``.module``, ``forward`` and ``state_dict`` see the result with no copy. timm turns ``foreach``
off when the EMA lives on another device (``device=``); here the engine copies the model into a
staging buffer on that device and the update stays one fused pass. timm itself is not needed.

Same as timm 1.0.31's ``ModelEmaV3`` (checked side by side by tests/test_integration_timm.py):
the constructor arguments and attributes, ``get_decay``, ``update(model, step)``, ``set``,
``forward``, and ``state_dict`` keys (``module.<name>``), so checkpoints move both ways. Where the
numbers differ, and why:

- float32/float64 EMA of a model of the same dtype: bit for bit (a fused lerp is torch's lerp).
- an EMA dtype other than the model's (``dtype=torch.float32`` for a bfloat16 model): timm's
  foreach path multiplies and adds (two roundings), this one lerps in float32 (one): within
  float rounding. The cast copy of the model that a lerp would need in torch is never made.
- bfloat16 EMA tensors with ``stochastic_rounding=True`` (timm's default) are updated by a port of
  timm's own routine, with the same private generator and the same tensor order and chunks, so the
  random stream and the result are timm's bit for bit. That routine is plain torch, **not fused**
  (it allocates float32 temporaries of up to 4M elements); ``dtype=torch.float32`` or
  ``stochastic_rounding=False`` keep bfloat16 models on the fused path.
- tensors are paired by name, not by position. ``update`` accepts the model the EMA was built
  from, or a wrapper of it (``DistributedDataParallel``'s ``.module``, ``torch.compile``'s
  ``_orig_mod``); another model with the same names and shapes re-pairs (the average carries over).
- timm leaves non-persistent buffers at their initial value; here they are averaged like the other
  buffers (the same for the usual constant ones, such as ``relative_position_index``). A tied
  parameter is averaged once (timm lerps it once per ``state_dict`` key).

``foreach`` is accepted and kept as an attribute; it only decides how the stochastic rounding
routine is chunked, as in timm. Moving the EMA (``model_ema.to(...)``, ``.cuda()``, ``.half()``,
``load_state_dict(..., assign=True)``) re-binds the storage to the moved tensors at the next update.
"""
from __future__ import annotations

import weakref
from copy import deepcopy
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..engine import AveragingEngine, structure_epoch
from . import check_int, check_number

__all__ = ["ModelEmaV3"]

DeviceLike = Union[str, torch.device]


def _lerp_stochastic_round_bf16_(ema_values: List[Tensor], model_values: List[Tensor], weight: float,
                                 chunk_numel: int = 2 ** 22, generator: Optional[torch.Generator] = None) -> None:
    """timm 1.0.31's ``_lerp_stochastic_round_bf16_`` (timm/utils/model_ema.py, Apache-2.0), unchanged in effect.

    Kept identical (chunking, order of the random draws) so the result equals timm's bit for bit.
    """
    def update_chunk(chunk_ema: List[Tensor], chunk_model: List[Tensor]) -> None:
        x = torch.cat([v.reshape(-1) for v in chunk_ema]).float()
        x.mul_(1. - weight).add_(torch.cat([v.reshape(-1) for v in chunk_model]), alpha=weight)
        bits = x.view(torch.int32)
        bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator))
        bits.bitwise_and_(-(1 << 16))  # truncate to bfloat16 precision (exactly representable in bfloat16)
        x_split = [xi.view(v.shape) for xi, v in zip(x.split([v.numel() for v in chunk_ema]), chunk_ema)]
        torch._foreach_copy_(chunk_ema, x_split)

    chunk_ema: List[Tensor] = []
    chunk_model: List[Tensor] = []
    numel = 0
    for ema_v, model_v in zip(ema_values, model_values):
        if numel and numel + ema_v.numel() > chunk_numel:
            update_chunk(chunk_ema, chunk_model)
            chunk_ema, chunk_model, numel = [], [], 0
        chunk_ema.append(ema_v)
        chunk_model.append(model_v)
        numel += ema_v.numel()
    if chunk_ema:
        update_chunk(chunk_ema, chunk_model)


def _inner_models(model: nn.Module) -> List[nn.Module]:
    """``model`` and the modules it wraps: DDP/DataParallel ``.module``, ``torch.compile``'s ``_orig_mod``."""
    chain = [model]
    while len(chain) < 8:
        modules = chain[-1]._modules
        inner = modules.get("module", None) or modules.get("_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        chain.append(inner)
    return chain


class ModelEmaV3(nn.Module):
    """Exponential moving average of a model's parameters and buffers, timm's ``ModelEmaV3`` API on the fused engine.

    Args:
        model: the model to average. ``.module`` becomes a deep copy of it in eval mode whose
            averaged tensors live in the engine's flat storage.
        decay: the EMA decay (the target decay with ``use_warmup``), in [0, 1].
        min_decay: lower clamp of the warmup decay, in [0, 1].
        update_after_step: ``update(model, step=n)`` copies the weights while
            ``n <= update_after_step + 1``.
        use_warmup: ramp the decay up as ``1 - (1 + k / warmup_gamma) ** -warmup_power``.
        warmup_gamma, warmup_power: the warmup's shape (both > 0).
        device: keep the EMA on this device (e.g. ``"cpu"`` for a GPU model); the update stays fused.
        dtype: keep the EMA in this dtype (e.g. ``torch.float32`` for a bfloat16 model); default: the model's.
        stochastic_rounding: update bfloat16 EMA tensors with timm's stochastic rounding (not fused).
        stochastic_rounding_seed: seed of the private generator of the stochastic rounding.
        foreach: accepted for timm compatibility (the update is always fused).
        exclude_buffers: average the parameters only and copy the buffers, as timm does.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[DeviceLike] = None, dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0, foreach: bool = True,
                 exclude_buffers: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelEmaV3: model must be an nn.Module, got {type(model).__name__}")
        check_number("ModelEmaV3", "decay", decay, 0.0, 1.0)
        check_number("ModelEmaV3", "min_decay", min_decay, 0.0, 1.0)
        check_number("ModelEmaV3", "warmup_gamma", warmup_gamma, 0.0, float("inf"), strict_low=True)
        check_number("ModelEmaV3", "warmup_power", warmup_power, 0.0, float("inf"), strict_low=True)
        check_int("ModelEmaV3", "update_after_step", update_after_step, 0)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"ModelEmaV3: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError("ModelEmaV3: the model has no parameters")
        # the same steps as timm: a deep copy in eval mode, moved and cast as asked
        self.module = deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach
        self.device = device
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        if self.device is not None and device != next(model.parameters()).device:
            self.foreach = False  # timm's flag; here it only shapes the stochastic rounding's chunks
            self.module.to(device=device)
        if self.dtype is not None:
            self.module.to(dtype=dtype)
        self._sr_generator = torch.Generator(device=next(self.module.parameters()).device)
        self._sr_generator.manual_seed(stochastic_rounding_seed)
        self._bind(model)

    # -------------------------------------------------------------------------- binding
    def _module_tensors(self) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = dict(self.module.named_parameters())
        if not self.exclude_buffers:
            out.update(self.module.named_buffers())
        return out

    def _bind(self, model: nn.Module) -> None:
        """Build the engine over ``model`` with ``.module``'s current values, dtypes and devices, then make
        ``.module``'s averaged tensors views of the engine's storage (the old storage is freed)."""
        named = list(model.named_parameters())
        if not self.exclude_buffers:
            named += list(model.named_buffers())
        mine = self._module_tensors()
        names = [n for n, _ in named]
        if sorted(names) != sorted(mine) or any(mine[n].shape != t.shape for n, t in named):
            raise ValueError("ModelEmaV3: the model's tensors (names and shapes) do not match the EMA's .module; "
                             f"model has {names[:3]}..., the EMA {list(mine)[:3]}...")
        devices = {mine[n].device for n in names}
        device: Optional[torch.device] = next(iter(devices)) if len(devices) == 1 else None
        if device is None and any(mine[n].device != t.device for n, t in named):
            raise ValueError("ModelEmaV3: .module spans several devices that differ from the model's")
        floating = [t.is_floating_point() for _, t in named]
        dtypes = tuple(mine[n].dtype if f else None for n, f in zip(names, floating))
        sr = [f and self.stochastic_rounding and mine[n].dtype == torch.bfloat16 for n, f in zip(names, floating)]
        engine = AveragingEngine(model, dtype=dtypes, device=device, include_buffers=not self.exclude_buffers,
                                 skip_nonfinite=False, segments=[int(s) for s in sr] if any(sr) else None,
                                 what="ModelEmaV3")
        engine.load_average({n: mine[n] for n in names})
        views = engine.views()
        for name, view in zip(names, views):
            mine[name].data = view
        self.__dict__["_engine"] = engine
        self.__dict__["_model_ref"] = weakref.ref(model)
        self.__dict__["_module_ref"] = weakref.ref(self.module)
        self.__dict__["_epoch"] = structure_epoch()
        self.__dict__["_bound"] = [(mine[n], v) for n, v in zip(names, views)]
        # timm's stochastic rounding walks state_dict() (or parameters()) order; keep that order for its stream
        index = {n: i for i, n in enumerate(names)}
        order = list(self.module.state_dict(keep_vars=True)) if not self.exclude_buffers else names
        self.__dict__["_sr_indices"] = [index[n] for n in order if n in index and sr[index[n]]]
        self.__dict__["_sr_views"] = [views[i] for i in self._sr_indices]

    def _module_moved(self) -> bool:
        """Whether ``.module``'s averaged tensors stopped being the engine's views (``.to()``, assign loads)."""
        if self._module_ref() is not self.module:
            return True
        bound = self._bound
        if structure_epoch() != self._epoch:
            mine = self._module_tensors()
            if len(mine) != len(bound) or any(mine.get(n) is not t for n, (t, _) in
                                              zip(self._engine.names, bound)):
                return True
            self.__dict__["_epoch"] = structure_epoch()
        # every .to()/assign replaces each tensor's data; the first and last stand for all
        return any(t.data_ptr() != v.data_ptr() or t.dtype != v.dtype for t, v in (bound[0], bound[-1]))

    def _source(self, model: nn.Module) -> nn.Module:
        """The model to read: the paired one (possibly inside a wrapper), else re-pair with a matching one."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelEmaV3: model must be an nn.Module, got {type(model).__name__}")
        paired = self._model_ref()
        chain = _inner_models(model)
        for candidate in chain:
            if candidate is paired:
                if self._module_moved():
                    self._bind(candidate)
                return candidate
        errors = []
        for candidate in chain:
            try:
                self._bind(candidate)
                return candidate
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(f"ModelEmaV3.update: this model cannot be paired with the EMA: {errors[-1]}")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "ModelEmaV3":
        out = super()._apply(fn, recurse)
        model = self.__dict__.get("_model_ref", lambda: None)()
        if model is not None and self._module_moved():
            self._bind(model)  # e.g. model_ema.to("cpu"): the average now lives where .module went
        return out

    # ------------------------------------------------------------------------- timm's API
    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay of an update at ``step`` (timm's formula); ``step=None`` gives ``decay``."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            decay = max(min(decay, self.decay), self.min_decay)
        else:
            decay = self.decay
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Average ``model`` in with ``get_decay(step)``: one fused pass, no host sync.

        With ``exclude_buffers`` the buffers are copied instead, as in timm.
        """
        decay = self.get_decay(step)
        source = self._source(model)
        engine = self._engine
        if self._sr_indices:
            engine.update("ema", decay=decay, segments=[0])
            self._stochastic_rounding_update(engine.model_tensors(), 1. - decay)
        else:
            engine.update("ema", decay=decay)
        if self.exclude_buffers:
            ema_buffers = list(self.module.buffers())
            if ema_buffers:
                torch._foreach_copy_(ema_buffers, list(source.buffers()))

    def _stochastic_rounding_update(self, model_tensors: Sequence[Tensor], weight: float) -> None:
        sources = [model_tensors[i] for i in self._sr_indices]
        if self.foreach:
            _lerp_stochastic_round_bf16_(self._sr_views, sources, weight, generator=self._sr_generator)
        else:  # timm's per-tensor path: one call (one chunk) per tensor
            for ema_v, model_v in zip(self._sr_views, sources):
                _lerp_stochastic_round_bf16_([ema_v], [model_v.to(device=self.device)], weight,
                                             generator=self._sr_generator)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s state (parameters and buffers) into the EMA, as timm's ``set``."""
        source = self._source(model)
        for ema_v, model_v in zip(self.module.state_dict().values(), source.state_dict().values()):
            ema_v.copy_(model_v.to(device=self.device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged model: ``self.module(*args, **kwargs)``."""
        return self.module(*args, **kwargs)

    # ----------------------------------------------------------------------- what ours adds
    @property
    def engine(self) -> AveragingEngine:
        """The :class:`~swm_fused.engine.AveragingEngine` that holds the average."""
        return self._engine

    @property
    def nbytes(self) -> int:
        """Bytes of the engine's storage (the average, plus any offload staging buffer)."""
        return self._engine.nbytes
