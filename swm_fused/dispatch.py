"""Backend selection: the only place that decides which kernels run an op.

- ``available_backends()`` lists what this install can run; ``backend_status()`` says why not.
- ``SWM_FUSED_BACKEND=name`` or ``with use_backend(name):`` forces one; a forced
  backend that is unavailable raises ``RuntimeError`` with the reason.
- Otherwise the choice is fixed per device type, never measured inside a call:
  CPU -> cpp; CUDA -> cuda (else triton, else reference); any other device -> reference.
  ``tune()`` (an explicit call) times cuda against triton on one device and
  makes the faster one the automatic choice there for this process.

cpp and cuda are two names for one thing: the compiled ``torch.ops.swm_fused`` ops,
whose kernels torch.library picks from the tensors' device. The names only say which
device a forced choice expects.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "SWM_FUSED_BACKEND"

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("swm_fused_backend", default=None)
_probe_cache: Dict[str, Tuple[Optional["Backend"], str]] = {}
_tuned_cuda: Dict[int, str] = {}  # device index -> backend name, set by tune()
TUNE_GENERATION = [0]  # bumped by tune(): choices cached elsewhere (the engine's bound step) are re-made

# os.environ.get of a missing key raises and catches a KeyError inside (microseconds); CPython's
# os.environ keeps its encoded items in a plain dict, read directly while os.environ is that object.
_ENVIRON = os.environ
_ENV_DATA: Optional[dict] = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
except AttributeError:
    _ENV_DATA = None


def automatic_choice() -> bool:
    """True when neither ``use_backend()`` nor ``SWM_FUSED_BACKEND`` forces a backend (hot paths bound to the
    automatic choice check this on every call, so it raises nothing inside)."""
    if _forced.get() is not None:
        return False
    if _ENV_DATA is not None and os.environ is _ENVIRON and _ENV_DATA.get(_ENV_KEY) is None:
        return True
    return not os.environ.get(ENV_VAR)


def environment_backend() -> Optional[str]:
    """The value of ``SWM_FUSED_BACKEND`` (None when unset or empty), read without raising inside."""
    if _ENV_DATA is not None and os.environ is _ENVIRON:
        if _ENV_DATA.get(_ENV_KEY) is None:
            return None
    return os.environ.get(ENV_VAR) or None


@dataclass(frozen=True)
class Backend:
    """A set of kernels and the device types they run on (None: every device)."""

    name: str
    kernels: ModuleType  # lerp_, swag_, merge_, any_nonfinite with the reference backend's signatures
    device_types: Optional[FrozenSet[str]]

    def supports(self, device: torch.device) -> bool:
        return self.device_types is None or device.type in self.device_types

    @property
    def NAME(self) -> str:  # noqa: N802  (the name backends have always answered to)
        return self.name


def _load(name: str) -> Backend:
    """Import backend ``name``; raise RuntimeError with the reason when it cannot run here."""
    if name == "reference":
        return Backend(name, importlib.import_module("swm_fused.backends.reference"), None)
    if name == "triton":
        module = importlib.import_module("swm_fused.triton")
        reason = module.unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        return Backend(name, module, frozenset({module.DEVICE_TYPE}))
    compiled = importlib.import_module("swm_fused.backends.compiled")
    if compiled.IMPORT_ERROR:
        raise RuntimeError(compiled.IMPORT_ERROR)
    device_type, key = ("cpu", "CPU") if name == "cpp" else ("cuda", "CUDA")
    if not compiled.has_kernels(key):
        raise RuntimeError(f"extension built without {key} kernels"
                           + (" (rebuild with a CUDA toolkit and a CUDA build of torch, without "
                              "SWM_FUSED_NO_CUDA=1)" if key == "CUDA" else ""))
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
    return Backend(name, compiled, frozenset({device_type}))


def _probe(name: str) -> Tuple[Optional[Backend], str]:
    """(backend, "") when ``name`` can run here, else (None, reason); cached."""
    if name not in _probe_cache:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
        try:
            _probe_cache[name] = (_load(name), "")
        except Exception as exc:  # any failure makes the backend unavailable, with its reason
            reason = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
            _probe_cache[name] = (None, reason)
    return _probe_cache[name]


def backend_status() -> Dict[str, str]:
    """Map each backend name to "" when available, else the reason it is not."""
    return {name: _probe(name)[1] for name in BACKENDS}


def available_backends() -> List[str]:
    """Names of the backends this install can run."""
    return [name for name, reason in backend_status().items() if not reason]


def get_backend(name: str) -> Backend:
    """Backend ``name``; ``RuntimeError`` with the reason when it is unavailable."""
    backend, reason = _probe(name)
    if backend is None:
        raise RuntimeError(f"{name}: {reason}")
    return backend


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force backend ``name`` inside the block (``None`` restores automatic choice).

    Raises ``RuntimeError`` at entry when the backend is unavailable.
    """
    if name is not None:
        get_backend(name)
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
        name = environment_backend()
    return name


def _automatic(device: torch.device) -> Backend:
    kind = device.type
    if kind == "cpu":
        candidates: Tuple[str, ...] = ("cpp",)
    elif kind == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        candidates = (_tuned_cuda[index],) if index in _tuned_cuda else ("cuda", "triton")
    else:
        candidates = ()
    for name in candidates:
        backend = _probe(name)[0]
        if backend is not None and (backend.device_types is None or kind in backend.device_types):
            return backend
    return get_backend("reference")


def select(device: torch.device) -> Backend:
    """The backend that runs an op on tensors living on ``device``."""
    name = forced_backend()
    if name is None:
        return _automatic(device)
    backend = get_backend(name)
    if not backend.supports(device):
        raise RuntimeError(f"{name}: cannot run on {device.type} tensors"
                           + (" (set TRITON_INTERPRET=1 to run Triton on CPU)" if name == "triton" else ""))
    return backend


def tune(device: Optional[torch.device] = None, *, numel: int = 1 << 24, repeats: int = 7) -> Dict[str, float]:
    """Time cuda and triton on one CUDA device and make the faster the automatic choice there.

    Runs a bf16 -> fp32 EMA over ``numel`` elements in many tensors (median of ``repeats``
    CUDA-event timings after warm-up) and synchronises: call it once at start-up, never in a
    training step. Returns milliseconds per backend; the choice lasts for this process.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("tune: no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    big, small = 1 << 20, 4096
    n_big = max(1, (numel // 2) // big)
    sizes = [big] * n_big + [small] * max(1, (numel - n_big * big) // small)
    avgs = [torch.randn(s, device=device) for s in sizes]
    srcs = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in sizes]
    times: Dict[str, float] = {}
    for name in ("cuda", "triton"):
        backend = _probe(name)[0]
        if backend is None or not backend.supports(device):
            continue
        samples = []
        for _ in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backend.kernels.lerp_(avgs, srcs, 0.001, None, None)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        times[name] = sorted(samples[2:])[len(samples[2:]) // 2]
    if times:
        _tuned_cuda[device.index] = min(times, key=times.__getitem__)
        TUNE_GENERATION[0] += 1
    return times
