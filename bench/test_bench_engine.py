"""Host overhead of the averaging front-ends (issue 10, section 4), side by side in one run.

- ``drop-in``: ``AveragedModel.update_parameters``, swm_fused's against torch's, for EMA
  (``get_ema_multi_avg_fn``) and the default SWA, on models of 40, 2,000, 8,000 and 20,000 tensors.
- ``host``: ``WeightAverager.update()`` (per-tensor lists, and a ``flatten_parameters`` model), its one
  C++ call alone, and a timm-style ``torch._foreach_lerp_`` over the same shapes, at 40, 2,000, 8,000 and
  20,000 tensors, one thread: ``tiny`` models (``Linear(2, 2)``: kernel time negligible, so this is host
  time) and the issue's ``table`` widths (kernels included). Cases and providers: ``bench/host_time.py``,
  which also runs them interleaved (``python bench/host_time.py``), the way to read a loaded machine.

Every benchmark stores its median and the case's torch baseline in ``extra_info``; ``--bench-quick``
keeps only the 40-tensor models (a smoke run; the numbers mean nothing).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as torch_swa

import host_time
from swm_fused import swa_utils as ours_swa

# (tensors, Linear width): every Linear holds 2 tensors
DROP_IN_MODELS = {40: 46, 2000: 23, 8000: 12, 20000: 7}
MIN_ROUNDS, MAX_ROUNDS = 5, 200

_medians: Dict[Tuple[str, int], Dict[str, float]] = defaultdict(dict)
_models: Dict[Tuple[int, int], nn.Module] = {}


def linear_stack(tensors: int, width: int) -> nn.Module:
    key = (tensors, width)
    if key not in _models:
        _models.clear()
        torch.manual_seed(0)
        _models[key] = nn.Sequential(*[nn.Linear(width, width) for _ in range(tensors // 2)])
    return _models[key]


def _run(benchmark, request, group: str, tensors: int, provider: str, call: Callable[[], None],
         baseline: str, numel: int) -> None:
    budget = request.config.getoption("--bench-budget")
    call()
    call()  # warm-up (the first update copies; pairing is cached)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget / max(first, 1e-9))))
    benchmark.group = f"{group}-{tensors}"
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    _medians[(group, tensors)][provider] = median
    base = _medians[(group, tensors)].get(baseline)
    benchmark.extra_info.update(group=group, tensors=tensors, numel=numel, provider=provider, median_s=median,
                                baseline=baseline, speedup=(base / median) if base else None,
                                quick=request.config.getoption("--bench-quick"))


def _shapes(request, table):
    return [40] if request.config.getoption("--bench-quick") else list(table)


DROP_IN = [(kind, t, p) for kind in ("ema", "swa") for t in DROP_IN_MODELS for p in ("torch", "swm_fused")]


@pytest.mark.parametrize(("kind", "tensors", "provider"), DROP_IN,
                         ids=[f"dropin-{k}-{t}-{p}" for k, t, p in DROP_IN])
def test_drop_in_update_parameters(benchmark, request, kind, tensors, provider):
    if tensors not in _shapes(request, DROP_IN_MODELS):
        pytest.skip("--bench-quick runs the 40-tensor model only")
    model = linear_stack(tensors, DROP_IN_MODELS[tensors])
    lib = torch_swa if provider == "torch" else ours_swa
    kwargs = {"multi_avg_fn": lib.get_ema_multi_avg_fn(0.999)} if kind == "ema" else {}
    averaged = lib.AveragedModel(model, **kwargs)
    numel = sum(p.numel() for p in model.parameters())
    _run(benchmark, request, f"dropin-{kind}", tensors, provider, lambda: averaged.update_parameters(model),
         "torch", numel)


HOST = [(w, t, p) for w in host_time.WIDTHS for t in host_time.TENSORS for p in host_time.PROVIDERS]


@pytest.fixture
def one_thread():
    """Host-time figures with one intra-op thread (the kernels of tiny tensors never split)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("width", "tensors", "provider"), HOST, ids=[f"host-{w}-{t}-{p}" for w, t, p in HOST])
def test_weight_averager_host_time(benchmark, request, one_thread, width, tensors, provider):
    if tensors not in _shapes(request, host_time.TABLE_WIDTH):
        pytest.skip("--bench-quick runs the 40-tensor models only")
    call, numel = host_time.make_call(provider, tensors, host_time.WIDTHS[width](tensors))
    _run(benchmark, request, f"host-{width}", tensors, provider, call, "foreach_lerp", numel)
    if benchmark.stats is not None:
        benchmark.extra_info.update(width=width, threads=torch.get_num_threads(),
                                    target_s=host_time.target_us(tensors, provider.endswith("flat")) * 1e-6)
