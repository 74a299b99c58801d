"""Sharpness-aware minimisation (SAM, ASAM) around any torch optimizer, fused and without host syncs.

:class:`SAM` has davda54/sam's interface (``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)``,
``first_step``/``second_step``/``step(closure)``) and its arithmetic, with the per-parameter Python
loops replaced by three multi-tensor ops of the ops layer:

- the global gradient norm: one :func:`~swm_fused.sq_norm` reduction per device, kept on the device;
- the ascent (save ``w``, add ``e_w``): one :func:`~swm_fused.sam_ascent_` pass per device and group kind;
- the restore: one :func:`~swm_fused.merge_` pass (``w = 1.0 * saved``, an exact copy), not a subtraction.

Formulas, sources and the recipes (GradScaler, bf16 autocast, DDP, SWA + SAM): docs/sam.md.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .ops import any_nonfinite, merge_, sam_ascent_, sq_norm

__all__ = ["SAM", "sam_bn_bypass", "sam_no_sync"]

EPS = 1e-12  # added to the gradient norm, as davda54/sam does


class _FirstPass:
    """What a GradScaler unscales in SAM's first pass: the wrapper's param groups under an identity of
    their own. GradScaler keeps one record per optimizer object and refuses to unscale one twice; the
    first pass's record lives under this object, the second pass's under the base optimizer, and
    ``scaler.update()`` backs off when either found Inf/NaN."""

    def __init__(self, sam: "SAM"):
        self._sam = sam

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self._sam.param_groups


def _check_rho(rho: Any, what: str) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(f"SAM: {what} must be a number, got {type(rho).__name__}")
    if not (math.isfinite(rho) and rho >= 0.0):
        raise ValueError(f"SAM: {what} must be a finite number >= 0, got {rho}")
    return float(rho)


def _check_adaptive(adaptive: Any, what: str) -> bool:
    if not isinstance(adaptive, bool):
        raise TypeError(f"SAM: {what} must be a bool, got {type(adaptive).__name__}")
    return adaptive


class SAM(Optimizer):
    """SAM (Foret et al. 2021) and ASAM (``adaptive=True``, Kwon et al. 2021) around a base optimizer.

    Args:
        params: parameters or param groups (a group may set its own ``rho`` and ``adaptive``).
        base_optimizer: an optimizer *class* (``torch.optim.SGD``); it is built on this wrapper's
            param groups with ``**kwargs``, and the two share the group dicts, so LR schedulers
            work on ``optimizer.base_optimizer`` and on the wrapper alike.
        rho: the neighbourhood radius (>= 0). ASAM's papers use larger values (e.g. 0.5 - 2.0).
        adaptive: ASAM's element-wise scaling by ``|w|``.
        interval: do the SAM ascent every ``interval`` steps and plain base-optimizer steps in
            between (Composer's ``interval``); counted in :meth:`second_step` calls.
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    One step: ``e_w = rho * g / (||g|| + 1e-12)`` (ASAM: ``rho * w^2 g / (|| |w| g || + 1e-12)``), the
    norm taken over every parameter with a gradient; :meth:`first_step` saves ``w`` and moves to
    ``w + e_w``; :meth:`second_step` restores the saved ``w`` bit for bit and steps the base
    optimizer with the gradient taken at ``w + e_w``. Neither synchronises with the host.

    Two ways to drive it (davda54/sam's)::

        loss_fn(model(x), y).backward()           # first pass
        optimizer.first_step(zero_grad=True)
        with sam_bn_bypass(model):                # BatchNorm statistics: first pass only
            loss_fn(model(x), y).backward()       # second pass, at w + e_w
        optimizer.second_step(zero_grad=True)

        loss_fn(model(x), y).backward()
        optimizer.step(closure)                   # closure: the second forward and backward

    With ``interval > 1``, :meth:`first_step` returns ``False`` on the plain steps (it then leaves the
    gradients alone): run the second pass only when it returned ``True``. ``step(closure)`` does this.
    Mixed precision: pass ``scaler=`` (a ``torch.amp.GradScaler``) to the step methods; see docs/sam.md.
    """

    def __init__(self, params: Any, base_optimizer: type, rho: float = 0.05, adaptive: bool = False, *,
                 interval: int = 1, **kwargs: Any):
        if isinstance(base_optimizer, Optimizer):
            raise TypeError(f"SAM: base_optimizer must be an optimizer class such as torch.optim.SGD, not an "
                            f"instance (got a {type(base_optimizer).__name__} object); SAM builds it from its "
                            "own param groups: SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError("SAM: base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD, "
                            f"got {base_optimizer!r}")
        rho = _check_rho(rho, "rho")
        adaptive = _check_adaptive(adaptive, "adaptive")
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
            raise ValueError(f"SAM: interval must be an int >= 1, got {interval!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of group dicts, shared
        self.defaults.update(self.base_optimizer.defaults)
        self.interval = int(interval)
        self._steps = 0  # second_step calls so far: the interval counts them
        self._saved: Dict[Tensor, Tensor] = {}  # param -> its copy from before the ascent
        self._perturbed: Optional[List[Tuple[List[Tensor], List[Tensor]]]] = None  # (params, saved) per device
        self._first_found_inf: Optional[Tensor] = None
        self._first_pass = _FirstPass(self)

    # -- param groups -------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (it may set ``rho`` and ``adaptive``; the base optimizer fills in its own defaults)."""
        if "rho" in param_group:
            param_group["rho"] = _check_rho(param_group["rho"], "a param group's rho")
        if "adaptive" in param_group:
            _check_adaptive(param_group["adaptive"], "a param group's adaptive")
        if "base_optimizer" not in self.__dict__:  # still in Optimizer.__init__
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list

    @property
    def sam_step_due(self) -> bool:
        """Whether the next :meth:`first_step` does the ascent (``interval``); a host-side counter."""
        return self._steps % self.interval == 0

    @property
    def is_perturbed(self) -> bool:
        """True between a :meth:`first_step` that moved the weights and the :meth:`second_step` that restores them."""
        return self._perturbed is not None

    def _buckets(self) -> Dict[Tuple[torch.device, float, bool], Tuple[List[Tensor], List[Tensor]]]:
        """(params, grads) with a gradient, by (device, rho, adaptive), in group order."""
        buckets: Dict[Tuple[torch.device, float, bool], Tuple[List[Tensor], List[Tensor]]] = defaultdict(
            lambda: ([], []))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                params, grads = buckets[(p.device, group["rho"], group["adaptive"])]
                params.append(p)
                grads.append(p.grad)
        return buckets

    def _saved_for(self, params: List[Tensor]) -> List[Tensor]:
        saved = []
        for p in params:
            s = self._saved.get(p)
            if s is None or s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
                s = self._saved[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
            saved.append(s)
        return saved

    # -- the two steps --------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: Optional[Any] = None) -> bool:
        """Save the weights and move them to ``w + e_w``; ``True`` when it did (see ``interval``).

        With ``scaler`` (an enabled GradScaler), the first pass's gradients are unscaled once here
        (and its Inf/NaN check recorded for ``scaler.update()``). A non-finite gradient norm leaves
        the weights where they are (they are still saved) and makes :meth:`second_step` skip the step.
        On a plain step (``interval``) nothing happens, the gradients are kept and ``False`` is returned.
        """
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step: the weights are already perturbed; call second_step() first")
        if not self.sam_step_due:
            return False
        scaling = scaler is not None and scaler.is_enabled()
        if scaling:
            scaler.unscale_(self._first_pass)
        buckets = self._buckets()
        if not buckets:
            self._perturbed = []
            return True
        shared = next(iter(buckets))[0]
        # One reduction per (device, adaptive); ASAM's norm is that of |w| * g.
        by_device: Dict[Tuple[torch.device, bool], Tuple[List[Tensor], List[Tensor]]] = defaultdict(lambda: ([], []))
        for (device, _, adaptive), (params, grads) in buckets.items():
            by_device[(device, adaptive)][0].extend(params)
            by_device[(device, adaptive)][1].extend(grads)
        squares = [sq_norm(grads, scale=params if adaptive else None).to(shared, non_blocking=True)
                   for (_, adaptive), (params, grads) in by_device.items()]
        total = squares[0]
        for more in squares[1:]:
            total = total + more
        norm = total.sqrt()
        found = torch.isfinite(total).logical_not().to(torch.float32) if scaling else None
        perturbed: Dict[torch.device, Tuple[List[Tensor], List[Tensor]]] = defaultdict(lambda: ([], []))
        for (device, rho, adaptive), (params, grads) in buckets.items():
            saved = self._saved_for(params)
            scale = (rho / (norm + EPS)).to(device, non_blocking=True)  # davda54: rho / (grad_norm + 1e-12)
            flag = None if found is None else found.to(device, non_blocking=True)
            sam_ascent_(params, grads, saved, scale, adaptive=adaptive, found_inf=flag)
            perturbed[device][0].extend(params)
            perturbed[device][1].extend(saved)
        self._perturbed = list(perturbed.values())
        self._first_found_inf = found
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Optional[Any] = None) -> None:
        """Restore the saved weights bit for bit, then step the base optimizer with the current gradients.

        With ``scaler``, this pass's gradients are unscaled once here and the step is skipped when
        either pass had Inf/NaN (``scaler.update()`` then backs off). The skip is decided on the device
        for base optimizers that take GradScaler's ``found_inf`` (``fused=True`` SGD/Adam/AdamW); others
        need one host sync for it, as ``GradScaler.step`` does for them.
        """
        if self._perturbed is not None:
            for params, saved in self._perturbed:
                if params:
                    merge_(params, [saved], [1.0])  # 1.0 * saved: an exact copy
            self._perturbed = None
        first_found, self._first_found_inf = self._first_found_inf, None
        self._steps += 1
        # An LR scheduler on the wrapper watches for step(); second_step is this optimizer's step too.
        self._opt_called = True  # type: ignore[attr-defined]
        if scaler is None or not scaler.is_enabled():
            self.base_optimizer.step()
        else:
            scaler.unscale_(self.base_optimizer)
            self._step_unless_nonfinite(first_found)
        if zero_grad:
            self.zero_grad()

    def _step_unless_nonfinite(self, first_found: Optional[Tensor]) -> None:
        grads_by_device: Dict[torch.device, List[Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads_by_device[p.grad.device].append(p.grad)
        if not grads_by_device:
            self.base_optimizer.step()
            return
        shared = next(iter(grads_by_device))
        flags = [any_nonfinite(grads).to(shared, non_blocking=True) for grads in grads_by_device.values()]
        if first_found is not None:
            flags.append(first_found.to(shared, non_blocking=True))
        found = flags[0] if len(flags) == 1 else torch.stack(flags).sum()
        base = self.base_optimizer
        if getattr(base, "_step_supports_amp_scaling", False):
            base.grad_scale, base.found_inf = None, found  # read on the device by the fused kernels
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
        elif not found.item():  # the one host sync, as GradScaler.step does for such optimizers
            base.step()

    def step(self, closure: Optional[Callable[[], Any]] = None, *, scaler: Optional[Any] = None) -> Any:  # type: ignore[override]
        """One SAM step; the first forward and backward must have run already.

        ``closure`` runs the second forward and backward (under ``torch.enable_grad``) and is required:
        SAM needs the gradient at ``w + e_w``. Returns what the closure returned (``None`` on a plain
        ``interval`` step, where it is not called).
        """
        if closure is None:
            raise TypeError("SAM.step: a closure is required: it runs the second forward and backward pass at "
                            "w + e_w (SAM evaluates the gradient twice); or call first_step() and second_step()")
        if not callable(closure):
            raise TypeError(f"SAM.step: closure must be callable, got {type(closure).__name__}")
        loss = None
        if self.first_step(zero_grad=True, scaler=scaler):
            with torch.enable_grad():
                loss = closure()
        self.second_step(scaler=scaler)
        return loss

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict (its param groups hold ``rho`` and ``adaptive``) and SAM's step count."""
        return {"base_optimizer": self.base_optimizer.state_dict(), "sam": {"steps": self._steps}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output and re-link the wrapper to the base optimizer's new param groups."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.load_state_dict: the weights are perturbed; call second_step() first")
        if not isinstance(state_dict, Mapping) or "base_optimizer" not in state_dict:
            raise ValueError("SAM.load_state_dict: expected a dict with key 'base_optimizer' (from SAM.state_dict())")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        self._steps = int(state_dict.get("sam", {}).get("steps", 0))

    def __repr__(self) -> str:
        return f"SAM(rho={self.defaults['rho']}, adaptive={self.defaults['adaptive']}, interval={self.interval}, " \
               f"base_optimizer={self.base_optimizer!r})"


@contextlib.contextmanager
def sam_bn_bypass(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers in training mode normalise with batch statistics but do not
    update their running statistics (nor ``num_batches_tracked``): use it around SAM's second forward.

    It clears ``track_running_stats`` on every BatchNorm (SyncBatchNorm included) that tracks them and
    sets it back on exit, even after an exception; ``momentum`` is never touched, so it comes back
    exactly. (davda54/sam's recipe sets momentum to 0 instead: that still counts a batch, and a
    non-finite batch statistic, as in a pass a GradScaler flags, turns into NaN running statistics.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sam_bn_bypass: model must be an nn.Module, got {type(model).__name__}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def sam_no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context for SAM's first forward and backward under DDP: ``model.no_sync()``, so the ascent
    uses this rank's own gradient (and no all-reduce is spent on it); a plain model gets a no-op context.
    The second forward and backward run outside it, so the descent uses the synchronised gradient."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()
