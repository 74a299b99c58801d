"""SAM's own work per step (first_step + second_step's restore; the base optimizer is a no-op) on CPU:
swm_fused's fused ops against davda54/sam's per-parameter loop and a ``torch._foreach_*`` version.

Every provider is credited with the same minimum traffic per element (docs/sam.md): the norm reads g
(ASAM: g and w), the ascent reads w and g and writes saved and w, the restore reads saved and writes
w. fp32 SAM: 4 + 16 + 8 = 28 bytes; ASAM 32. bf16 models: half of that.
Run: ``pytest bench/test_bench_sam.py --benchmark-only`` (``--bench-quick``: a smoke run).
"""
from __future__ import annotations

import gc
import time
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused.sam import SAM

from cases import DTYPE_NAMES, workload_shapes
from workloads import numel

RHO = 0.05
WORKLOADS = ("gpt2", "resnet50", "small20k")
PROVIDERS = ("davda54", "torch:foreach", "swm:cpp")
MIN_ROUNDS, MAX_ROUNDS = 3, 30

_medians: Dict[str, Dict[str, float]] = defaultdict(dict)
_current: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}


class NoStep(torch.optim.Optimizer):
    """A base optimizer that does nothing: the benchmark times SAM's own work only."""

    def __init__(self, params, **kwargs):
        super().__init__(params, dict(kwargs))

    def step(self, closure=None):  # noqa: D401
        return None


def bytes_per_element(dtype: torch.dtype, adaptive: bool) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return size * ((2 if adaptive else 1) + 4 + 2)  # norm, ascent (w, g, saved, w), restore (saved, w)


def _params(workload: str, dtype: torch.dtype, quick: bool) -> Tuple[List[Tensor], List[Tensor]]:
    key = (workload, dtype, quick)
    if key not in _current:
        _current.clear()
        gc.collect()
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for _, s in
                  workload_shapes(workload, quick)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * 1e-3
        _current[key] = (params, [p.grad for p in params])
    return _current[key]


def _davda54(params: List[Tensor], adaptive: bool) -> Callable[[], None]:
    """davda54/sam's first_step and second_step, the loop as written there (clone per parameter)."""
    state: Dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def run() -> None:
        norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2) for p in params]),
                          p=2)
        scale = RHO / (norm + 1e-12)
        for p in params:
            state[p] = p.data.clone()
            p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p))
        for p in params:
            p.data = state[p]
    return run


def _foreach(params: List[Tensor], adaptive: bool) -> Callable[[], None]:
    """The same with torch's multi-tensor ops: _foreach_norm, _foreach_copy_, _foreach_mul, _foreach_add_."""
    grads = [p.grad for p in params]
    saved = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def run() -> None:
        scaled = torch._foreach_mul(grads, params) if adaptive else grads
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        scale = RHO / (norm + 1e-12)
        torch._foreach_copy_(saved, params)
        if adaptive:
            e = torch._foreach_mul(torch._foreach_mul(params, params), grads)
            torch._foreach_mul_(e, scale)
        else:
            e = torch._foreach_mul(grads, scale)
        torch._foreach_add_(params, e)
        torch._foreach_copy_(params, saved)
    return run


def _fused(params: List[Tensor], adaptive: bool) -> Callable[[], None]:
    optimizer = SAM(params, NoStep, rho=RHO, adaptive=adaptive)

    def run() -> None:
        with swm_fused.use_backend("cpp"):
            optimizer.first_step()
            optimizer.second_step()
    return run


PREPARE = {"davda54": _davda54, "torch:foreach": _foreach, "swm:cpp": _fused}
CASES = [(w, dt, a) for w in WORKLOADS for dt in (torch.float32, torch.bfloat16) for a in (False, True)
         if dt == torch.float32 or w == "gpt2"]


def _case_name(workload: str, dtype: torch.dtype, adaptive: bool) -> str:
    return f"{'asam' if adaptive else 'sam'}-{workload}-{DTYPE_NAMES[dtype]}"


PAIRS = [(c, p) for c in CASES for p in PROVIDERS]


@pytest.mark.parametrize(("case", "provider"), PAIRS, ids=[f"{_case_name(*c)}-{p}" for c, p in PAIRS])
def test_sam_step(benchmark, request, copy_gbps, case, provider):
    workload, dtype, adaptive = case
    quick = request.config.getoption("--bench-quick")
    budget = request.config.getoption("--bench-budget")
    if "cpp" not in swm_fused.available_backends():
        pytest.skip("the cpp backend is not built")
    params, _ = _params(workload, dtype, quick)
    run = PREPARE[provider](params, adaptive)
    name = _case_name(workload, dtype, adaptive)
    benchmark.group = name
    start = time.perf_counter()
    run()  # warm-up; also sizes the number of rounds
    first = time.perf_counter() - start
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget / max(first, 1e-9))))
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    _medians[name][provider] = median
    elements = numel(workload_shapes(workload, quick))
    nbytes = elements * bytes_per_element(dtype, adaptive)
    baseline = _medians[name].get("davda54")
    benchmark.extra_info.update(case=name, provider=provider, workload=workload, model_dtype=DTYPE_NAMES[dtype],
                                adaptive=adaptive, numel=elements, bytes=nbytes, median_s=median,
                                gbps=nbytes / median / 1e9, copy_gbps=copy_gbps,
                                copy_fraction=nbytes / median / 1e9 / copy_gbps,
                                speedup_vs_davda54=None if baseline is None else baseline / median, quick=quick)
