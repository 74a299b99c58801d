"""CPU benchmarks of the merge methods: swm_fused against a plain-torch version of the same formula.

Each case merges K = 3 models into a base (slerp: two models) over the leading tensors of the
GPT-2 workload (up to 2^25 elements; ``--bench-quick`` cuts it to a few small tensors), with fp32
or bf16 models. ``swm`` is :func:`swm_fused.merge.merge_models` (what ``swm-fused merge`` runs per
tensor); ``torch:stack`` is the formula written the usual way in plain torch, per tensor in fp32:
stack the task vectors, select, mask and reduce over the stack (as mergekit's methods do). Both
are credited with the same bytes, the minimum traffic: read K+1 inputs, write one output.
The deterministic methods are checked to agree before they are timed.

``test_fused_op`` times the two fused ops of the sparsifying merges on the same tensors, against
plain torch of the same element-wise formula (``torch``): ``ties_merge_`` (K = 3 models and a base,
trimmed to bands from ``kthvalue`` computed before timing, sign election, disjoint mean, rounded into
the model dtype; credited with reading K + 1 inputs and writing the output) and ``dare_drop_`` (an fp32
task vector dropped and rescaled in place against fp32 ``u``, with one keep probability or an fp64 one
per element; credited with reading and writing the task vector and reading u (and p)).

Results land in the same pytest-benchmark JSON and report as bench/test_bench_ops.py's.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

from cases import QUICK_MAX_NUMEL
from workloads import WORKLOADS, numel, shrink

import swm_fused
from swm_fused import merge as M

K = 3
MAX_NUMEL = 1 << 25
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS: Dict[str, dict] = {
    "ties": dict(density=0.3), "dare_ties": dict(density=0.3, seed=0), "breadcrumbs": dict(density=0.3, gamma=0.01),
    "della": dict(density=0.3, epsilon=0.1, seed=0), "model_stock": {}, "slerp": dict(t=0.3),
}
DETERMINISTIC = ("ties", "breadcrumbs", "model_stock", "slerp")
MIN_ROUNDS, MAX_ROUNDS = 3, 20


# ---------------------------------------------------------------- plain torch, one tensor at a time, fp32

def _kth_largest(x: Tensor, k: int) -> Tensor:
    """Per row of x (K, n): the k-th largest value, shaped to broadcast against x."""
    return x.kthvalue(x.shape[1] - k + 1, dim=1, keepdim=True).values


def _elect(x: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    positive = x.sum(0) >= 0
    kept = torch.where(positive, x > 0, x < 0)
    mixed = (x * kept).sum(0)
    if normalize:
        divisor = (weights * kept).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def torch_merge(method: str, base: Tensor, models: List[Tensor], key: str, params: dict) -> Tensor:
    b = base.float().reshape(-1)
    if method == "slerp":
        a, c = b, models[0].float().reshape(-1)
        cos = (a @ c / (a.norm() * c.norm())).clamp(-1, 1)
        t = params["t"]
        if cos.abs() > 0.9995:
            out = (1 - t) * a + t * c
        else:
            omega = torch.arccos(cos)
            out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * c) / torch.sin(omega)
        return out.reshape(base.shape).to(base.dtype)
    deltas = torch.stack([m.float().reshape(-1) - b for m in models])  # (K, n)
    n = b.numel()
    if method == "model_stock":
        gram = deltas @ deltas.T
        norms = gram.diagonal().sqrt()
        cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        c = cos[torch.triu_indices(len(models), len(models), 1).unbind()].mean().clamp(0, 1)
        t = len(models) * c / (1 + (len(models) - 1) * c)
        out = t * (deltas.mean(0) + b) + (1 - t) * b
        return out.reshape(base.shape).to(base.dtype)
    weights = torch.ones(len(models), 1)
    density = params["density"]
    k = min(max(int(math.floor(density * n + 0.5)), 1), n)
    magnitudes = deltas.abs()
    if method == "ties":
        deltas = deltas * (magnitudes >= _kth_largest(magnitudes, k))
    elif method == "breadcrumbs":
        n_top = min(int(math.floor(params["gamma"] * n + 0.5)), n - 1)
        k = min(k, n - n_top)
        hi = _kth_largest(magnitudes, n_top) if n_top else torch.full((len(models), 1), math.inf)
        deltas = deltas * ((magnitudes >= _kth_largest(magnitudes, n_top + k)) & (magnitudes < hi))
    elif method == "dare_ties":
        deltas = deltas * (torch.rand_like(deltas) < density) / density
    elif method == "della":
        ranks = magnitudes.argsort(dim=1).argsort(dim=1).double()
        p = (density - params["epsilon"]) + 2 * params["epsilon"] * ranks / max(n - 1, 1)
        deltas = deltas * (torch.rand_like(deltas) < p) / p.float()
    if method == "breadcrumbs":
        mixed = (weights * deltas).sum(0)
    else:
        mixed = _elect(weights * deltas, weights, normalize=method in ("ties", "della"))
    return (b + mixed).reshape(base.shape).to(base.dtype)


# ---------------------------------------------------------------- cases

CASES = [(method, dtype) for method in METHODS for dtype in DTYPES]
PROVIDERS = ("torch:stack", "swm")
_current: Dict[Tuple[str, bool], Tuple] = {}
_medians: Dict[str, Dict[str, float]] = {}


def _data(dtype_name: str, quick: bool):
    key = (dtype_name, quick)
    if key not in _current:
        _current.clear()
        gc.collect()
        shapes = shrink(WORKLOADS["gpt2"](), QUICK_MAX_NUMEL if quick else MAX_NUMEL)
        dtype = DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(0)
        base = {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes}
        models = [{name: (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(dtype) for name, t in base.items()}
                  for _ in range(K)]
        _current[key] = (base, models, numel(shapes))
    return _current[key]


def _prepare(method: str, provider: str, base, models) -> Callable[[], Dict[str, Tensor]]:
    params = METHODS[method]
    if provider == "swm":
        if method == "slerp":
            return lambda: M.slerp(base, models[0], params["t"])
        return lambda: M.merge_models(method, models, base, **params)
    ends = [models[0]] if method == "slerp" else models
    return lambda: {key: torch_merge(method, t, [m[key] for m in ends], key, params) for key, t in base.items()}


def _time(benchmark, request, case: str, provider: str, run: Callable, check: Callable = lambda result: None
          ) -> Optional[float]:
    """Warm up (which sizes the rounds) and ``check`` the warm-up's result, then time ``run``: the median
    seconds, also kept for the case's other providers; None when nothing was timed."""
    quick = request.config.getoption("--bench-quick")
    budget = request.config.getoption("--bench-budget")
    benchmark.group = case
    start = time.perf_counter()
    check(run())
    first = time.perf_counter() - start
    rounds = MIN_ROUNDS if quick else min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget / max(first, 1e-9))))
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    if benchmark.stats is None:
        return None
    _medians.setdefault(case, {})[provider] = benchmark.stats.stats.median
    return benchmark.stats.stats.median


def _record(benchmark, request, copy_gbps: float, case: str, provider: str, baseline: str, median: float,
            nbytes: int, **info) -> None:
    """GB/s of the credited bytes, and the speed-up over ``baseline`` measured in this run, in extra_info."""
    base_median = _medians[case].get(baseline) if provider != baseline else None
    gbps = nbytes / median / 1e9
    benchmark.extra_info.update(
        case=case, provider=provider, workload="gpt2", bytes=nbytes, median_s=median, gbps=gbps,
        baseline=baseline if base_median else None, speedup=base_median / median if base_median else None,
        copy_gbps=copy_gbps, copy_fraction=gbps / copy_gbps, quick=request.config.getoption("--bench-quick"),
        **info)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("method", "dtype_name"), CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_merge_method(benchmark, request, copy_gbps, method, dtype_name, provider):
    base, models, count = _data(dtype_name, request.config.getoption("--bench-quick"))
    run = _prepare(method, provider, base, models)
    case = f"{method}{K if method != 'slerp' else 2}-gpt2-{dtype_name}"

    def check(result: Dict[str, Tensor]) -> None:
        if method in DETERMINISTIC and provider == "swm":  # the two providers compute the same thing
            reference = _prepare(method, "torch:stack", base, models)()
            for key, tensor in result.items():
                tol = 2e-2 if dtype_name == "bf16" else 1e-4
                torch.testing.assert_close(tensor.float(), reference[key].float(), rtol=tol, atol=tol)

    median = _time(benchmark, request, case, provider, run, check)
    if median is None:
        return
    inputs = 2 if method == "slerp" else K + 1
    _record(benchmark, request, copy_gbps, case, provider, "torch:stack", median,
            count * (inputs + 1) * DTYPES[dtype_name].itemsize, op=method, model_dtype=dtype_name,
            average_dtype=dtype_name, k=inputs - (method != "slerp"), numel=count,
            bytes_per_element=(inputs + 1) * DTYPES[dtype_name].itemsize)


# ---------------------------------------------------------------- the fused ops alone, against plain torch

FUSED_OPS = {"ties_merge": 2 + K, "dare_drop": 3, "dare_drop_per_element": 5}  # op -> bytes/element in 4-byte units
FUSED_CASES = [("ties_merge", d) for d in DTYPES] + [("dare_drop", "fp32"), ("dare_drop_per_element", "fp32")]
FUSED_WEIGHTS, FUSED_SCALE, FUSED_DENSITY = [0.5, 1.0, 0.75], 0.9, 0.3
_fused: Dict[Tuple[str, str, bool], Dict] = {}


def _fused_data(op: str, dtype_name: str, quick: bool) -> Dict:
    """The op's tensors from the merge cases' models, built once (the thresholds and draws outside the timing)."""
    key = (op, dtype_name, quick)
    if key not in _fused:
        _fused.clear()
        base, models, count = _data(dtype_name, quick)
        keys = list(base)
        data: Dict = {"count": count, "keys": keys}
        if op == "ties_merge":
            bands = torch.empty(K, len(keys), 2)
            bands[:, :, 1] = math.inf
            for k, m in enumerate(models):
                for i, name in enumerate(keys):
                    magnitudes = (m[name].float() - base[name].float()).abs().reshape(-1)
                    kept = min(max(int(math.floor(FUSED_DENSITY * magnitudes.numel() + 0.5)), 1), magnitudes.numel())
                    bands[k, i, 0] = magnitudes.kthvalue(magnitudes.numel() - kept + 1).values
            data.update(base=[base[n] for n in keys], models=[[m[n] for n in keys] for m in models], bands=bands,
                        out=[torch.empty_like(base[n]) for n in keys])
        else:
            gen = torch.Generator().manual_seed(1)
            data["deltas"] = [models[0][n].float() - base[n].float() for n in keys]
            data["u"] = [torch.rand(t.shape, generator=gen) for t in data["deltas"]]
            data["p"] = FUSED_DENSITY if op == "dare_drop" else \
                [torch.rand(t.shape, generator=gen, dtype=torch.float64) * 0.4 + 0.1 for t in data["deltas"]]
        _fused[key] = data
    return _fused[key]


def torch_ties_merge(base: Tensor, models: List[Tensor], bands: Tensor) -> Tensor:
    """ties_merge_'s formula in plain torch over one tensor: stack the task vectors, trim, elect, mean, add."""
    b = base.float().reshape(-1)
    deltas = torch.stack([m.float().reshape(-1) - b for m in models])
    magnitudes = deltas.abs()
    deltas = deltas * ((magnitudes >= bands[:, :1]) & (magnitudes < bands[:, 1:]))
    weights = torch.tensor(FUSED_WEIGHTS)[:, None]
    return (b + FUSED_SCALE * _elect(weights * deltas, weights, normalize=True)).reshape(base.shape).to(base.dtype)


def _prepare_fused(op: str, provider: str, data: Dict) -> Callable[[], None]:
    if op == "ties_merge":
        if provider == "swm":
            return lambda: swm_fused.ties_merge_(data["out"], data["models"], FUSED_WEIGHTS, base=data["base"],
                                                 thresholds=data["bands"], normalize=True, scale=FUSED_SCALE)

        def run_torch() -> None:
            for i, b in enumerate(data["base"]):
                data["out"][i].copy_(torch_ties_merge(b, [m[i] for m in data["models"]], data["bands"][:, i]))
        return run_torch
    p = data["p"]
    if provider == "swm":
        return lambda: swm_fused.dare_drop_(data["deltas"], data["u"], p)

    def run_torch() -> None:  # the drop and the rescale as torch writes them: a mask, then a division
        for i, (d, u) in enumerate(zip(data["deltas"], data["u"])):
            keep = p if isinstance(p, float) else p[i]
            d.mul_(u < keep).div_(keep)
    return run_torch


@pytest.mark.parametrize("provider", ("torch", "swm"))
@pytest.mark.parametrize(("op", "dtype_name"), FUSED_CASES, ids=[f"{o}-{d}" for o, d in FUSED_CASES])
def test_fused_op(benchmark, request, copy_gbps, op, dtype_name, provider):
    data = _fused_data(op, dtype_name, request.config.getoption("--bench-quick"))
    run = _prepare_fused(op, provider, data)
    case = f"{op}{K if op == 'ties_merge' else ''}-gpt2-{dtype_name}"

    def check(_) -> None:
        if op == "ties_merge" and provider == "swm":  # the two providers compute the same thing
            fused = [t.clone() for t in data["out"]]
            _prepare_fused(op, "torch", data)()
            for got, want in zip(fused, data["out"]):
                tol = 2e-2 if dtype_name == "bf16" else 1e-5
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)

    median = _time(benchmark, request, case, provider, run, check)
    if median is None:
        return
    per_element = FUSED_OPS[op] * (DTYPES[dtype_name].itemsize if op == "ties_merge" else 4)
    _record(benchmark, request, copy_gbps, case, provider, "torch", median, data["count"] * per_element, op=op,
            model_dtype=dtype_name, average_dtype=dtype_name, k=K if op == "ties_merge" else 1, numel=data["count"],
            bytes_per_element=per_element)
