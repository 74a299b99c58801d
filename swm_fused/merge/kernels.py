"""The element-wise steps of the sparsifying merges, in plain torch: the seams for fused kernels.

Each function here is one pass (or two, for ``rescale="l1"``) over its tensors with an exact
element-wise contract, written in the docstring. They compute in float32, or float64 when a
delta is float64 (:func:`compute_dtype`), and return tensors of that dtype; the caller rounds
once, at the store. A fused op in :mod:`swm_fused.ops` can replace each of them one for one:
same arguments, same contract, same results up to the order of floating-point additions.

Randomness: :func:`uniform` draws the ``u`` that DARE and DELLA compare with keep probabilities,
from a generator seeded per (merge seed, tensor name, model index), so a merge with a given seed
is reproducible tensor by tensor, in any order, streamed or in memory (on one device type: CPU
and CUDA generators give different streams).
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

MAJORITY_SIGNS = ("sum", "count")
RESCALES = ("density", "l1", "none")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of ``dtypes`` is float64, else float32: the dtype every merge step computes in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def derive_seed(seed: int, key: str, index: int) -> int:
    """The generator seed for model ``index``'s draws on tensor ``key``: 63 bits of BLAKE2b(seed, index, key)."""
    digest = hashlib.blake2b(f"{int(seed)}\0{int(index)}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def uniform(seed: int, key: str, index: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """``u ~ U[0, 1)``, float32, of ``shape`` on ``device``: ``torch.rand`` from a generator seeded with
    :func:`derive_seed` ``(seed, key, index)``. Every random merge draws its ``u`` here."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, key, index))
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def _float32_at_least(p: float) -> float:
    """The smallest float32 >= p, so that ``u < p`` is exact for float32 ``u`` compared in float32."""
    p32 = float(np.float32(p))
    if p32 < p:
        p32 = float(np.nextafter(np.float32(p32), np.float32(np.inf)))
    return p32


def drop_and_rescale_(delta: Tensor, u: Tensor, keep_prob: Union[float, Tensor], rescale: str = "density") -> Tensor:
    """DARE's (and DELLA's) drop and rescale, element-wise and in place: ``delta_j <- [u_j < p_j] * c_j * delta_j``.

    Args:
        delta: the task vector ``delta_i = theta_i - theta_base`` of one model, float32 or float64;
            overwritten with the result, which is also returned.
        u: uniform draws in [0, 1) (float32, :func:`uniform`), same shape.
        keep_prob: ``p``, the probability to keep an entry: a float in (0, 1] (DARE: the density),
            or a float64 tensor of per-entry probabilities (DELLA), same shape.
        rescale: ``c``. ``"density"``: ``c_j = 1 / p_j``, which keeps every entry's expectation
            (``E[out_j] = delta_j``); ``"l1"``: one ``c = ||delta||_1 / ||[u < p] * delta||_1`` for the
            tensor (sums in the compute dtype; ``c = 1`` when the kept entries sum to 0), which keeps
            the L1 norm exactly; ``"none"``: ``c = 1``.

    The comparison ``u_j < p_j`` is exact (no rounding of ``p``); ``delta_j / p_j`` is rounded once.
    One pass over ``delta`` and ``u`` (two for ``"l1"``).
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {', '.join(RESCALES)}, got {rescale!r}")
    before = float(delta.abs().sum()) if rescale == "l1" else 0.0
    if isinstance(keep_prob, Tensor):
        delta.mul_(u < keep_prob)  # float32 u against float64 p: compared exactly, in float64
        if rescale == "density":
            delta.div_(keep_prob)
    else:
        delta.mul_(u < _float32_at_least(float(keep_prob)))
        if rescale == "density" and keep_prob != 1.0:
            delta.div_(float(keep_prob))
    if rescale == "l1":
        after = float(delta.abs().sum())
        if after > 0 and before != after:
            delta.mul_(before / after)
    return delta


def ties_elect_and_sum(deltas: Sequence[Tensor], weights: Sequence[float], majority_sign: str = "sum"
                       ) -> Tuple[Tensor, Tensor]:
    """TIES' sign election and disjoint sum, element-wise over K (sparsified) task vectors.

    With ``x_ij = w_i * delta_ij`` for model i and entry j:

    - elected sign ``s_j = +1`` if ``sum_i x_ij >= 0`` (``majority_sign="sum"``) or
      ``sum_i sign(x_ij) >= 0`` (``"count"``, where ``sign(0) = 0``), else ``-1``: an element
      >= 0 counts as +;
    - entry ij is kept when ``x_ij != 0`` and ``sign(x_ij) == s_j`` (a dropped, zero entry is
      never kept, so it adds nothing to either sum);
    - returns ``(M, D)`` with ``M_j = sum_i [kept_ij] x_ij`` and ``D_j = sum_i [kept_ij] w_i``.

    The caller forms the mixed delta ``M / D`` (``D = 0`` read as 1) with ``normalize``, else ``M``.
    ``deltas`` may be a lazy sequence that computes each task vector on access: it is read twice
    (election, then sums), and at most one task vector is alive at a time, so the temporaries are
    ``M``, ``D`` and the election's sum, whatever K is. Computes in float32 (float64 when a delta
    is float64); results are in that dtype.
    """
    if majority_sign not in MAJORITY_SIGNS:
        raise ValueError(f"majority_sign must be one of {', '.join(MAJORITY_SIGNS)}, got {majority_sign!r}")
    if len(deltas) == 0 or len(deltas) != len(weights):
        raise ValueError(f"ties_elect_and_sum needs one weight per delta and at least one delta, got "
                         f"{len(deltas)} deltas and {len(weights)} weights")
    election: Optional[Tensor] = None
    for i in range(len(deltas)):
        x = deltas[i] * weights[i]
        if majority_sign == "count":
            x.sign_()
        election = x if election is None else election.add_(x)
        del x
    assert election is not None
    positive = election >= 0
    mixed = election.zero_()
    del election
    divisor = torch.zeros_like(mixed)
    for i in range(len(deltas)):
        x = deltas[i] * weights[i]
        kept = torch.where(positive, x > 0, x < 0)
        mixed.add_(x.mul_(kept))
        divisor.add_(kept, alpha=weights[i])
        del x, kept
    return mixed, divisor
