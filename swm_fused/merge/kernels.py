"""The random draws of DARE and DELLA, and their drop and rescale on top of the fused op.

The element-wise steps of the sparsifying merges run as fused ops of :mod:`swm_fused.ops`, one pass
each over their tensors, on every backend: :func:`swm_fused.ties_merge_` (TIES' trim, sign election
and masked sums, and the weighted sums of the other task-vector methods) and :func:`swm_fused.dare_drop_`
(DARE's and DELLA's drop and rescale), which :func:`drop_and_rescale_` wraps with the L1 rescale.
They compute in float32, or float64 when a tensor is float64 (:func:`compute_dtype`), and round once,
at the store.

Randomness: :func:`uniform` draws the ``u`` that DARE and DELLA compare with keep probabilities,
from a generator seeded per (merge seed, tensor name, model index), so a merge with a given seed
is reproducible tensor by tensor, in any order, streamed or in memory (on one device type: CPU
and CUDA generators give different streams).
"""
from __future__ import annotations

import hashlib
from typing import Sequence, Union

import torch
from torch import Tensor

from ..ops import dare_drop_

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

    The comparison ``u_j < p_j`` is exact; ``delta_j / p_j`` is computed in float64 and rounded once.
    One pass of :func:`swm_fused.dare_drop_` over ``delta`` and ``u``; ``"l1"`` adds the two sums and a
    scaling pass, all on the device (no host sync).
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {', '.join(RESCALES)}, got {rescale!r}")
    if rescale != "l1":
        dare_drop_(delta, u, keep_prob, rescale=rescale == "density")
        return delta
    before = delta.abs().sum()
    dare_drop_(delta, u, keep_prob, rescale=False)
    after = delta.abs().sum()
    return delta.mul_(torch.where(after > 0, before / after, 1.0))
