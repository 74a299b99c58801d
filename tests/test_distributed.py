"""torch.distributed on CPU with gloo: SWM across ranks and broadcasting, against single-process math."""
from __future__ import annotations

from typing import List

import pytest
import torch
import torch.distributed as dist

import swm_fused
from swm_fused.distributed import broadcast_average_, merge_across_ranks_
from _helpers import FLOAT64_TOLERANCES, assert_close
from _multiprocess import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SHAPES = [(17, 3), (4097,), (1,), (2, 2, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]


def trajectory(rank: int, seed: int) -> List[torch.Tensor]:
    """The average that `rank` holds: random, different on each rank, reproducible in the parent."""
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(SHAPES, DTYPES)]


def _merge_worker(rank, world, seed, weights, as_flat):
    tensors = trajectory(rank, seed)
    target = swm_fused.FlatBuffer.from_tensors(tensors) if as_flat else tensors
    merge_across_ranks_(target, weights[rank])
    return [t.clone() for t in (target.views if as_flat else target)]


@pytest.mark.parametrize("as_flat", [False, True], ids=["list", "flatbuffer"])
def test_merge_across_ranks_matches_single_process_math(tmp_path, fresh_seed, as_flat):
    weights = [0.25 + torch.rand(()).item(), 0.25 + torch.rand(()).item()]
    results = run_ranks(_merge_worker, 2, tmp_path, fresh_seed, weights, as_flat)
    per_rank = [trajectory(r, fresh_seed) for r in range(2)]
    for rank, result in enumerate(results):
        assert "ok" in result, result.get("traceback")
        for i, got in enumerate(result["ok"]):
            expected = sum(w * t[i].double() for w, t in zip(weights, per_rank)) / sum(weights)
            assert got.dtype == DTYPES[i]
            assert_close(got, expected, *FLOAT64_TOLERANCES[got.dtype], what=f"rank {rank} tensor {i}")


def _mismatch_worker(rank, world):
    tensors = [torch.randn(4, 3), torch.randn(5 if rank == 0 else 6)]
    merge_across_ranks_(tensors, 1.0)


def test_shape_mismatch_raises_the_same_error_on_every_rank(tmp_path):
    results = run_ranks(_mismatch_worker, 2, tmp_path)
    errors = [r.get("error") for r in results]
    assert all(e and e.startswith("ValueError: merge_across_ranks_: tensor 1") for e in errors), errors
    assert errors[0] == errors[1]


def _bad_weight_worker(rank, world):
    before = [torch.randn(3)]
    tensors = [t.clone() for t in before]
    try:
        merge_across_ranks_(tensors, float("nan") if rank == 1 else 1.0)
    finally:
        assert torch.equal(tensors[0], before[0]), "a rejected merge must not touch the tensors"


def test_invalid_weight_on_one_rank_raises_everywhere_and_changes_nothing(tmp_path):
    errors = [r.get("error") for r in run_ranks(_bad_weight_worker, 2, tmp_path)]
    assert all(e and "rank 1 gave weight nan" in e for e in errors), errors


def _broadcast_worker(rank, world, seed):
    tensors = trajectory(rank, seed)
    broadcast_average_(tensors, src=1)
    return tensors


def test_broadcast_average_copies_the_source_rank_everywhere(tmp_path, fresh_seed):
    results = run_ranks(_broadcast_worker, 2, tmp_path, fresh_seed)
    owner = trajectory(1, fresh_seed)
    for result in results:
        assert "ok" in result, result.get("traceback")
        for got, expected in zip(result["ok"], owner):
            assert got.dtype == expected.dtype and torch.equal(got, expected)
