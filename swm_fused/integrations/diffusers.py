"""diffusers' ``EMAModel`` on the fused engine: change one import, keep the arguments and the checkpoints.

::

    # from diffusers.training_utils import EMAModel
    from swm_fused.integrations.diffusers import EMAModel

    ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    ...
    ema_unet.step(unet.parameters())

How it works: the shadow parameters are views into an
:class:`~swm_fused.engine.AveragingEngine`'s flat storage, each in its own dtype (as diffusers
keeps each shadow in its parameter's dtype, or in the one given to ``to``). ``step`` is one fused
``ema_`` pass over them. diffusers' ``foreach=True`` path allocates a full temporary copy of the
model (``torch._foreach_sub``) and its own training scripts leave it off (diffusers PR 7685);
this one allocates nothing per step, reads no value back to the host, and needs no ``foreach``.
When the shadows live on another device than the parameters (``to("cpu")`` of a GPU model's EMA),
``step`` copies the parameters into a staging buffer there and the update stays one fused pass,
so the EMA need not travel to the GPU and back around each step.

Same as diffusers 0.42's ``EMAModel`` (checked side by side by tests/test_integration_diffusers.py):
the constructor arguments, ``get_decay``, ``step``, ``copy_to``, ``store`` / ``restore``, ``to``,
``pin_memory``, ``state_dict`` / ``load_state_dict`` (the same keys; a state saved by either loads
into the other) and ``save_pretrained`` / ``from_pretrained`` (the same files). Where it differs:

- numbers: diffusers computes ``s - (1 - decay) * (s - p)`` (three roundings), this one torch's
  fma lerp (one). They agree within float rounding; parameters with ``requires_grad=False`` are
  copied exactly, as in diffusers.
- a parameter list of another length than the EMA's raises ``ValueError`` (diffusers zips, and
  silently drops the rest); a ``load_state_dict`` error leaves everything unchanged.
- ``min_decay`` may be an int in ``load_state_dict`` (diffusers insists on a float).
- DeepSpeed ZeRO-3 partitioned parameters are refused (``RuntimeError``): diffusers gathers them
  around each update; this class does not.
- ``foreach`` is accepted and kept as an attribute; it changes nothing (the update is always fused).
"""
from __future__ import annotations

import copy
import numbers
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..engine import AveragingEngine, StaleModelError
from ..flat import FlatBuffer
from . import check_int, check_number, require

_diffusers = require("diffusers", "diffusers")
from diffusers.utils import deprecate  # noqa: E402  (after require: a clear ImportError first)

__all__ = ["EMAModel"]

DeviceLike = Union[str, torch.device]
_Spec = Tuple[torch.Size, torch.dtype, torch.device]


def _zero3_enabled() -> bool:
    # diffusers asks transformers on every step; that module is loaded whenever ZeRO-3 is configured
    module = sys.modules.get("transformers.integrations.deepspeed")
    return bool(module is not None and module.is_deepspeed_zero3_enabled())


def _tensors(parameters: Iterable[Tensor], what: str) -> List[Tensor]:
    if isinstance(parameters, Tensor):
        raise TypeError(f"EMAModel.{what}: expected an iterable of tensors (e.g. model.parameters()), got a Tensor")
    params = list(parameters)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"EMAModel.{what}: parameter {i} is a {type(p).__name__}, not a Tensor")
    return params


class EMAModel:
    """Exponential moving average of parameters, diffusers' ``EMAModel`` API on the fused engine.

    Args:
        parameters: the parameters to track (``model.parameters()``); a module is accepted with
            diffusers' deprecation warning, and turns ``use_ema_warmup`` on, as in diffusers.
        decay: the largest decay, in [0, 1].
        min_decay: the smallest decay, in [0, 1].
        update_after_step: step ``n`` copies the parameters while ``n <= update_after_step + 1``.
        use_ema_warmup: decay ``1 - (1 + k / inv_gamma) ** -power``; otherwise ``(1 + k) / (10 + k)``,
            with ``k = n - update_after_step - 1``; both clamped to ``[min_decay, decay]``.
        inv_gamma, power: the warmup's shape (both > 0).
        foreach: accepted for diffusers compatibility (the update is always fused).
        model_cls, model_config: a diffusers ``ModelMixin`` class and its config, for
            :meth:`save_pretrained`.
        **kwargs: diffusers' deprecated ``max_value``, ``min_value`` and ``device``.
    """

    def __init__(self, parameters: Iterable[Tensor], decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_ema_warmup: bool = False, inv_gamma: Union[float, int] = 1.0,
                 power: Union[float, int] = 2 / 3, foreach: bool = False, model_cls: Optional[Any] = None,
                 model_config: Optional[Dict[str, Any]] = None, **kwargs: Any):
        if isinstance(parameters, nn.Module):
            deprecate("passing a `torch.nn.Module` to `ExponentialMovingAverage`", "1.0.0",
                      "Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated. "
                      "Please pass the parameters of the module instead.", standard_warn=False)
            parameters = parameters.parameters()
            use_ema_warmup = True  # diffusers does the same, for backwards compatibility
        if kwargs.get("max_value", None) is not None:
            deprecate("max_value", "1.0.0", "The `max_value` argument is deprecated. Please use `decay` instead.",
                      standard_warn=False)
            decay = kwargs["max_value"]
        if kwargs.get("min_value", None) is not None:
            deprecate("min_value", "1.0.0", "The `min_value` argument is deprecated. Please use `min_decay` instead.",
                      standard_warn=False)
            min_decay = kwargs["min_value"]
        check_number("EMAModel", "decay", decay, 0.0, 1.0)
        check_number("EMAModel", "min_decay", min_decay, 0.0, 1.0)
        check_number("EMAModel", "inv_gamma", inv_gamma, 0.0, float("inf"), strict_low=True)
        check_number("EMAModel", "power", power, 0.0, float("inf"), strict_low=True)
        check_int("EMAModel", "update_after_step", update_after_step, 0)
        params = _tensors(parameters, "__init__")
        if not params:
            raise ValueError("EMAModel: no parameters to track")
        if _zero3_enabled():
            raise RuntimeError("EMAModel: DeepSpeed ZeRO-3 partitioned parameters are not supported by the fused EMA; "
                               "use diffusers.training_utils.EMAModel")
        self._params: List[Tensor] = params
        self._engine: Optional[AveragingEngine] = None
        self._parked: Optional[FlatBuffer] = None  # the shadows while no engine is built (see _place)
        # the shadows start as copies of the parameters, in their dtypes and on their devices
        self._place([(p.shape, p.dtype, p.device) for p in params], None)
        if kwargs.get("device", None) is not None:
            deprecate("device", "1.0.0", "The `device` argument is deprecated. Please use `to` instead.",
                      standard_warn=False)
            self.to(device=kwargs["device"])
        self.temp_stored_params: Optional[List[Tensor]] = None
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value: Optional[float] = None  # set in step()
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config

    # ------------------------------------------------------------------------- placement
    def _new_engine(self, params: Sequence[Tensor], specs: Sequence[_Spec]) -> AveragingEngine:
        colocated = all(device == p.device for (_, _, device), p in zip(specs, params))
        devices = {device for _, _, device in specs}
        if not colocated and len(devices) != 1:
            raise ValueError(f"EMAModel: the shadow parameters are on several devices ({sorted(map(str, devices))}) "
                             "that differ from the parameters'; move them with to(device)")
        dtypes = tuple(dtype if p.is_floating_point() else None for (_, dtype, _), p in zip(specs, params))
        return AveragingEngine([(str(i), p) for i, p in enumerate(params)], dtype=dtypes,
                               device=None if colocated else next(iter(devices)), skip_nonfinite=False,
                               what="EMAModel")

    @torch.no_grad()
    def _place(self, specs: Sequence[_Spec], values: Optional[Sequence[Tensor]], non_blocking: bool = False,
               pin_memory: bool = False) -> None:
        """Make the shadows ``values`` laid out as ``specs`` (shape, dtype, device each).

        Next to the parameters they go straight into a new engine. Elsewhere they are *parked* in a
        plain FlatBuffer and the engine (with its offload staging buffer) is built at the next
        step: diffusers' offload loop moves the EMA to the GPU before each step and back to the
        CPU after it, and a parked EMA costs that loop no staging buffer it would never use.
        ``values=None``: the engine's copy of the parameters is the value (construction).
        """
        if not pin_memory and all(device == p.device for (_, _, device), p in zip(specs, self._params)):
            engine = self._new_engine(self._params, specs)
            if values is not None:
                torch._foreach_copy_(engine.views(), list(values), non_blocking=non_blocking)
            self._engine, self._parked = engine, None
            return
        parked = FlatBuffer(specs, pin_memory=pin_memory)
        if values is not None:
            torch._foreach_copy_(parked.views, list(values), non_blocking=non_blocking)
        self._engine, self._parked = None, parked

    def _ensure_engine(self, params: List[Tensor]) -> AveragingEngine:
        """The engine over ``params`` (the same tensors as last time: O(n) identity checks, no walk)."""
        engine = self._engine
        if engine is not None and all(a is b for a, b in zip(params, self._params)):
            return engine
        self._rebuild(params)
        return self._engine

    def _rebuild(self, params: List[Tensor]) -> None:
        shadows = self.shadow_params
        for i, (p, s) in enumerate(zip(params, shadows)):
            if p.shape != s.shape:
                raise ValueError(f"EMAModel.step: parameter {i} has shape {tuple(p.shape)}, its shadow "
                                 f"{tuple(s.shape)}")
        specs = [(s.shape, s.dtype, s.device) for s in shadows]
        engine = self._new_engine(params, specs)
        with torch.no_grad():
            torch._foreach_copy_(engine.views(), shadows)
        self._params, self._engine, self._parked = params, engine, None

    def _check_count(self, params: Sequence[Tensor], what: str) -> None:
        if len(params) != len(self._params):
            raise ValueError(f"EMAModel.{what}: got {len(params)} parameters, the EMA tracks {len(self._params)}")

    @property
    def shadow_params(self) -> List[Tensor]:
        """The averaged parameters (live views: they change with each :meth:`step`)."""
        if self._engine is not None:
            return self._engine.views()
        return list(self._parked.views)

    @shadow_params.setter
    def shadow_params(self, values: List[Tensor]) -> None:
        self._adopt(values, "shadow_params")

    def _check_shadows(self, values: Any, what: str) -> List[Tensor]:
        if not isinstance(values, list):
            raise ValueError("shadow_params must be a list")  # diffusers' type and message
        if not all(isinstance(p, Tensor) for p in values):
            raise ValueError("shadow_params must all be Tensors")
        self._check_count(values, what)
        for i, (v, p) in enumerate(zip(values, self._params)):
            if v.shape != p.shape:
                raise ValueError(f"EMAModel.{what}: shadow {i} has shape {tuple(v.shape)}, the parameter "
                                 f"{tuple(p.shape)}")
            if v.is_floating_point() and v.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                raise ValueError(f"EMAModel.{what}: shadow {i} has dtype {v.dtype}; the EMA keeps float32, "
                                 "float64, bfloat16 or float16")
        return values

    def _adopt(self, values: List[Tensor], what: str) -> None:
        """Take ``values`` as the shadows, in their own dtypes and devices (as diffusers does)."""
        values = self._check_shadows(values, what)
        self._place([(v.shape, v.dtype, v.device) for v in values], [v.detach() for v in values])

    # ------------------------------------------------------------------------ diffusers' API
    @classmethod
    def from_pretrained(cls, path: str, model_cls: Any, foreach: bool = False) -> "EMAModel":
        """Load an EMA saved by :meth:`save_pretrained` (ours or diffusers'): the weights and the EMA settings."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path: str) -> None:
        """Save the averaged weights as a ``model_cls`` model, with the EMA settings in its config."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of step ``optimization_step`` (diffusers' formula, computed on the host)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur_decay_value = (1 + step) / (10 + step)
        cur_decay_value = min(cur_decay_value, self.decay)
        cur_decay_value = max(cur_decay_value, self.min_decay)
        return cur_decay_value

    @torch.no_grad()
    def step(self, parameters: Iterable[Tensor]) -> None:
        """Average ``parameters`` in with ``get_decay(optimization_step + 1)``: one fused pass, no host sync.

        Parameters with ``requires_grad=False`` are copied, as in diffusers.
        """
        if isinstance(parameters, nn.Module):
            deprecate("passing a `torch.nn.Module` to `ExponentialMovingAverage.step`", "1.0.0",
                      "Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is deprecated. "
                      "Please pass the parameters of the module instead.", standard_warn=False)
            parameters = parameters.parameters()
        params = _tensors(parameters, "step")
        self._check_count(params, "step")
        if _zero3_enabled():
            raise RuntimeError("EMAModel.step: DeepSpeed ZeRO-3 partitioned parameters are not supported")
        engine = self._ensure_engine(params)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        try:
            engine.update("ema", decay=decay)
        except StaleModelError:  # a parameter moved to another device since the engine was built
            self._rebuild(params)
            engine = self._engine
            engine.update("ema", decay=decay)
        frozen = [i for i, p in enumerate(params) if not p.requires_grad]
        if frozen:
            shadows = engine.views()
            torch._foreach_copy_([shadows[i] for i in frozen], [params[i] for i in frozen])

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[Tensor]) -> None:
        """Write the averaged parameters into ``parameters`` (cast to their dtypes and devices)."""
        params = _tensors(parameters, "copy_to")
        self._check_count(params, "copy_to")
        torch._foreach_copy_([p.data for p in params], self.shadow_params)

    def pin_memory(self) -> None:
        """Move the shadows to page-locked host memory (fast, asynchronous copies to and from a GPU)."""
        shadows = self.shadow_params
        if any(s.device.type != "cpu" for s in shadows):
            raise RuntimeError("EMAModel.pin_memory: only CPU tensors can be pinned; call to('cpu') first")
        self._place([(s.shape, s.dtype, s.device) for s in shadows], shadows, pin_memory=True)

    def to(self, device: Optional[DeviceLike] = None, dtype: Optional[torch.dtype] = None,
           non_blocking: bool = False) -> None:
        """Move the shadows to ``device`` and cast the floating ones to ``dtype`` (``None``: unchanged)."""
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"EMAModel.to: dtype must be a torch.dtype, got {type(dtype).__name__}")
        shadows = self.shadow_params
        target = torch.device(device) if device is not None else None
        if target is not None and target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())  # as Tensor.to resolves it
        specs = [(s.shape, dtype if dtype is not None and s.is_floating_point() else s.dtype,
                  target if target is not None else s.device) for s in shadows]
        if all(spec[1] == s.dtype and spec[2] == s.device for spec, s in zip(specs, shadows)):
            return  # nothing moves (Tensor.to would return the tensors themselves)
        self._place(specs, shadows, non_blocking=non_blocking)

    def state_dict(self) -> Dict[str, Any]:
        """The EMA's state with diffusers' keys; ``shadow_params`` holds references to the live shadows."""
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    @torch.no_grad()
    def store(self, parameters: Iterable[Tensor]) -> None:
        """Save a copy of ``parameters`` on the CPU (one allocation), for :meth:`restore`."""
        params = _tensors(parameters, "store")
        self.temp_stored_params = list(FlatBuffer.from_tensors([p.detach() for p in params], device="cpu").views)

    @torch.no_grad()
    def restore(self, parameters: Iterable[Tensor]) -> None:
        """Write the parameters saved by :meth:`store` back, bit for bit, and drop the copy."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = _tensors(parameters, "restore")
        if len(params) != len(self.temp_stored_params):
            raise ValueError(f"EMAModel.restore: got {len(params)} parameters, {len(self.temp_stored_params)} "
                             "were stored")
        torch._foreach_copy_([p.data for p in params], self.temp_stored_params)
        self.temp_stored_params = None

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (ours or diffusers'); missing keys keep their values.

        Everything is checked first (``ValueError``, as diffusers raises); on error nothing changes.
        The shadows are copied in their own dtypes and devices, as diffusers takes them.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"EMAModel.load_state_dict: expected a dict, got {type(state_dict).__name__}")
        get = state_dict.get
        decay = get("decay", self.decay)
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        min_decay = get("min_decay", self.min_decay)
        if isinstance(min_decay, bool) or not isinstance(min_decay, numbers.Real):
            raise ValueError("Invalid min_decay")
        values = {"decay": decay, "min_decay": min_decay}
        for key, types in (("optimization_step", int), ("update_after_step", int), ("use_ema_warmup", bool),
                           ("inv_gamma", (float, int)), ("power", (float, int))):
            value = get(key, getattr(self, key))
            if not isinstance(value, types):
                raise ValueError(f"Invalid {key}")
            values[key] = value
        shadows = get("shadow_params", None)
        if shadows is not None:
            self._adopt(shadows, "load_state_dict")  # checks first; places the shadows only if all is well
        for key, value in values.items():
            setattr(self, key, copy.deepcopy(value))
