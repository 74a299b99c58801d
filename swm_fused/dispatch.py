"""Backend discovery and selection: the only place that decides who runs an op.

- ``available_backends()`` lists what this install can run.
- ``SWM_FUSED_BACKEND=name`` or ``with use_backend(name):`` forces one; a forced
  backend that is unavailable raises ``RuntimeError`` with the reason.
- Otherwise each call picks the best backend for the tensors' device:
  CPU: cpp, else reference. CUDA: whichever of cuda and triton measured faster
  on this device (timed once, lazily), else reference.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "cpp", "cuda", "triton")
_ENV_VAR = "SWM_FUSED_BACKEND"

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("swm_fused_backend", default=None)
_probe_cache: Dict[str, Tuple[Optional[ModuleType], str]] = {}
_cuda_choice: Dict[int, str] = {}


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(name: str) -> Tuple[Optional[ModuleType], str]:
    """Import backend ``name``; return (module, "") or (None, reason)."""
    if name in _probe_cache:
        return _probe_cache[name]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name = "swm_fused.triton" if name == "triton" else f"swm_fused.backends.{name}"
    try:
        module = importlib.import_module(module_name)
        reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else ""
    except Exception as exc:  # any import failure makes the backend unavailable, with its reason
        module, reason = None, f"{type(exc).__name__}: {exc}"
    result = (module if not reason else None, reason)
    _probe_cache[name] = result
    return result


def backend_status() -> Dict[str, str]:
    """Map each backend name to "" when available, else the reason it is not."""
    return {name: _probe(name)[1] for name in BACKENDS}


def available_backends() -> List[str]:
    """Names of the backends this install can run, best first for CPU then GPU."""
    return [name for name, reason in backend_status().items() if not reason]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force backend ``name`` inside the block (``None`` restores automatic choice).

    Raises ``RuntimeError`` at entry when the backend is unavailable.
    """
    if name is not None:
        _require(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` or ``SWM_FUSED_BACKEND``, if any.

    Under ``torch.compile`` only the environment variable counts: the choice is made
    while tracing, and dynamo cannot read context variables.
    """
    name = None if torch.compiler.is_compiling() else _forced.get()
    if name is None:
        name = os.environ.get(_ENV_VAR) or None
    return name


def _require(name: str) -> ModuleType:
    module, reason = _probe(name)
    if module is None:
        raise RuntimeError(f"{name}: {reason}")
    return module


def select(device: torch.device) -> ModuleType:
    """The backend module that runs an op on tensors living on ``device``."""
    name = forced_backend()
    if name is not None:
        module = _require(name)
        if not module.supports(device):
            raise RuntimeError(f"{name}: cannot run on {device.type} tensors"
                               + (" (set TRITON_INTERPRET=1 to run Triton on CPU)" if name == "triton" else ""))
        return module
    if device.type == "cuda":
        return _require(_fastest_cuda_backend(device))
    for candidate in ("cpp", "reference"):
        module = _probe(candidate)[0]
        if module is not None and module.supports(device):
            return module
    return _require("reference")


def _fastest_cuda_backend(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_choice:
        candidates = [n for n in ("cuda", "triton") if _probe(n)[0] is not None]
        if not candidates:
            _cuda_choice[index] = "reference"
        elif len(candidates) == 1:
            _cuda_choice[index] = candidates[0]
        else:
            _cuda_choice[index] = min(candidates, key=lambda n: _time_backend(n, device))
    return _cuda_choice[index]


def _time_backend(name: str, device: torch.device) -> float:
    """Milliseconds for one bf16->fp32 EMA over 16M elements in many tensors (median of 5)."""
    module = _require(name)
    sizes = [1 << 20] * 12 + [4096] * 1024
    avgs = [torch.randn(s, device=device) for s in sizes]
    srcs = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in sizes]
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module.lerp_(avgs, srcs, 0.001, None, None)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[2:])[2]
