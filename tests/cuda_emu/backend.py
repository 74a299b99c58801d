"""The emulated CUDA kernels as a backend object with the reference backend's primitives.

``load()`` builds (or finds cached) the host build of csrc/cuda (see build.py) and returns an
object shaped like a swm_fused backend module: ``NAME``, ``unavailable_reason()``, ``supports()``
and the primitives of :mod:`swm_fused.backends.reference` (lerp_, lerp_multi_, swag_, merge_,
any_nonfinite, sq_norm, sam_ascent_, ties_merge_, dare_drop_), with the same signatures and
semantics. The primitives call ``torch.ops.swm_fused_emu.*``: csrc/cuda/bindings.cpp's kernels,
registered for CPU tensors, running the unchanged .cu kernels through the emulated launch.
``load()`` never raises; a failed build shows in ``unavailable_reason()``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import build as _build

NAME = "cuda_emu"


class EmulatedCudaBackend:
    """Module-like backend over the ``swm_fused_emu`` ops (CPU tensors only)."""

    NAME = NAME

    def __init__(self, library: Optional[Path], reason: str, compiler: Optional[str]):
        self.library = library
        self.compiler = compiler  # None: no host compiler at all (the only case tests may skip)
        self._reason = reason

    def unavailable_reason(self) -> str:
        """"" when the emulated library is built and loaded, else why not."""
        return self._reason

    def supports(self, device: torch.device) -> bool:
        """The emulated device is the CPU."""
        return torch.device(device).type == "cpu"

    @staticmethod
    def lerp_(avgs: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
              weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """avg <- lerp(avg, src, w), w = weight_tensor if given else weight; skipped when found_inf != 0."""
        torch.ops.swm_fused_emu.lerp_(list(avgs), list(srcs), float(weight), weight_tensor, found_inf)

    @staticmethod
    def lerp_multi_(avgs: Sequence[Sequence[Tensor]], srcs: Sequence[Tensor], weights: Sequence[float],
                    found_inf: Optional[Tensor]) -> None:
        """avgs[k][i] <- lerp(avgs[k][i], srcs[i], weights[k]) for every k; skipped when found_inf != 0."""
        flat_avgs = list(itertools.chain.from_iterable(avgs))  # k-major, as the schema wants
        torch.ops.swm_fused_emu.lerp_multi_(flat_avgs, list(srcs), [float(w) for w in weights], found_inf)

    @staticmethod
    def swag_(means: Sequence[Tensor], sq_means: Sequence[Tensor], srcs: Sequence[Tensor], weight: float,
              weight_tensor: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """mean <- lerp(mean, src, w) and sq_mean <- lerp(sq_mean, src*src, w), in one pass."""
        torch.ops.swm_fused_emu.swag_(list(means), list(sq_means), list(srcs), float(weight), weight_tensor,
                                      found_inf)

    @staticmethod
    def merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> None:
        """out <- sum_k weights[k] * inputs[k][i]; ``out`` may be one of the inputs."""
        flat_inputs = list(itertools.chain.from_iterable(inputs))  # k-major, as the schema wants
        torch.ops.swm_fused_emu.merge_(list(outs), flat_inputs, [float(w) for w in weights])

    @staticmethod
    def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
        """0-dim float32 tensor: 1.0 if any element of any (floating) tensor is NaN or Inf, else 0.0."""
        tensors = list(tensors)
        if not tensors:  # as the reference: an empty list has nothing non-finite
            return torch.zeros((), dtype=torch.float32)
        return torch.ops.swm_fused_emu.any_nonfinite(tensors)

    @staticmethod
    def sq_norm(tensors: Sequence[Tensor], scale: Sequence[Tensor]) -> Tensor:
        """0-dim: sum over the tensors of (scale * t)^2 (``scale`` empty: no scale); float64 if a tensor is."""
        tensors = list(tensors)
        if not tensors:  # as the reference: nothing to sum
            return torch.zeros((), dtype=torch.float32)
        return torch.ops.swm_fused_emu.sq_norm(tensors, list(scale))

    @staticmethod
    def sam_ascent_(params: Sequence[Tensor], grads: Sequence[Tensor], saved: Sequence[Tensor], scale: Tensor,
                    adaptive: bool, found_inf: Optional[Tensor]) -> None:
        """saved <- w; w <- w + ((w*w if adaptive) * g) * scale; w unchanged when found_inf != 0."""
        torch.ops.swm_fused_emu.sam_ascent_(list(params), list(grads), list(saved), scale, bool(adaptive), found_inf)

    @staticmethod
    def ties_merge_(outs: Sequence[Tensor], inputs: Sequence[Sequence[Tensor]], weights: Sequence[float],
                    base: Sequence[Tensor], thresholds: Optional[Tensor], majority_sign: str, normalize: bool,
                    scale: float, task_vectors: bool) -> None:
        """out <- base + scale * TIES(inputs): trim, sign election, masked sum (and mean), one pass."""
        flat_inputs = list(itertools.chain.from_iterable(inputs))  # k-major, as the schema wants
        torch.ops.swm_fused_emu.ties_merge_(list(outs), flat_inputs, [float(w) for w in weights], list(base),
                                            thresholds, majority_sign, bool(normalize), float(scale),
                                            bool(task_vectors))

    @staticmethod
    def dare_drop_(deltas: Sequence[Tensor], u: Sequence[Tensor], keep_prob: Sequence[Tensor], p: float,
                   rescale: bool) -> None:
        """delta <- [u < p] * (delta / p if rescale else delta); p = keep_prob[i] or, when it is empty, the number p."""
        torch.ops.swm_fused_emu.dare_drop_(list(deltas), list(u), list(keep_prob), float(p), bool(rescale))

    # Self-test hooks of the emulation layer (not backend primitives).
    @staticmethod
    def launch_stats() -> List[int]:
        """[kernel launches, blocks run] since the library was loaded."""
        return list(torch.ops.swm_fused_emu._emu_stats())

    @staticmethod
    def sync_stats() -> List[int]:
        """[block barriers, warp barriers, fibers] completed/run since the library was loaded."""
        return list(torch.ops.swm_fused_emu._emu_sync_stats())

    @staticmethod
    def set_schedule(mode: int) -> int:
        """The scheduler's pass order: 0 = increasing thread index, 1 = decreasing. Returns the previous mode."""
        return int(torch.ops.swm_fused_emu._emu_schedule(mode))


_LOADED: Optional[EmulatedCudaBackend] = None


def load() -> EmulatedCudaBackend:
    """Build if needed, load the library once per process, and return the backend object."""
    global _LOADED
    if _LOADED is None:
        compiler = _build.find_compiler()
        try:
            library = _build.build()
            torch.ops.load_library(str(library))
            _LOADED = EmulatedCudaBackend(library, "", compiler)
        except Exception as exc:  # noqa: BLE001 - any failure becomes the reason, reported by the tests
            _LOADED = EmulatedCudaBackend(None, f"emulated CUDA build failed: {exc}", compiler)
    return _LOADED
