"""CPU micro-benchmarks: every case of ``cases.cpu_cases()`` with every provider, side by side.

Each benchmark stores in ``extra_info`` what ``bench/report.py`` needs: the bytes
credited (docs/design.md's minimum, the same for every provider of a case), GB/s, the
speed-up over the case's torch baseline, and the fraction of the copy bandwidth
measured in this run.
"""
from __future__ import annotations

import gc
import time
from collections import defaultdict
from typing import Dict, Tuple

import pytest
import torch

import kway
from cases import DTYPE_NAMES, Case, CaseData, Unsupported, build_data, cpu_cases, pairs, providers, speedup, \
    workload_shapes

CPU = torch.device("cpu")
CASES = {c.name: c for c in cpu_cases()}
PROVIDERS = {p.name: p for p in providers("cpu")}
PAIRS = [(c.name, p.name) for c, p in pairs(CASES.values(), PROVIDERS.values())]
MIN_ROUNDS, MAX_ROUNDS = 3, 30
INTERLEAVED_KS = (2, 3, 8)

_medians: Dict[str, Dict[str, float]] = defaultdict(dict)  # case name -> provider -> median seconds
_current: Dict[Tuple[Case, bool], CaseData] = {}  # the case being run; its providers share its tensors


def _case_data(case: Case, quick: bool) -> CaseData:
    key = (case, quick)
    if key not in _current:
        _current.clear()
        gc.collect()  # free the previous case's tensors before allocating the next
        _current[key] = build_data(case, workload_shapes(case.workload, quick), CPU)
    return _current[key]


@pytest.mark.parametrize(("case_name", "provider_name"), PAIRS, ids=[f"{c}-{p}" for c, p in PAIRS])
def test_op(benchmark, request, copy_gbps, case_name, provider_name):
    case, provider = CASES[case_name], PROVIDERS[provider_name]
    quick = request.config.getoption("--bench-quick")
    budget = request.config.getoption("--bench-budget")
    data = _case_data(case, quick)
    try:
        run = provider.prepare(case, data)
    except Unsupported as exc:
        pytest.skip(str(exc))
    benchmark.group = case.name
    start = time.perf_counter()
    run()  # warm-up; also sizes the number of rounds
    first = time.perf_counter() - start
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget / max(first, 1e-9))))
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: it ran once, nothing was timed
        return
    median = benchmark.stats.stats.median
    _medians[case.name][provider.name] = median
    baseline, ratio = speedup(provider, _medians[case.name], median)
    gbps = data.nbytes / median / 1e9
    benchmark.extra_info.update(
        case=case.name, provider=provider.name, op=case.op, workload=case.workload,
        model_dtype=DTYPE_NAMES[case.model_dtype], average_dtype=DTYPE_NAMES[case.average_dtype], k=case.k,
        numel=data.numel, bytes=data.nbytes, bytes_per_element=case.bytes_per_element, median_s=median,
        gbps=gbps, baseline=baseline, speedup=ratio, copy_gbps=copy_gbps, copy_fraction=gbps / copy_gbps,
        quick=quick,
    )


@pytest.mark.parametrize("k", INTERLEAVED_KS)
def test_merge_interleaved(benchmark, request, k):
    """The K-way fp32 merge on the GPT-2-like list, the torch loop and the copy ceiling in interleaved
    rounds (bench/kway.py): each round times the copy and the torch loop (the untimed ``setup`` of
    pytest-benchmark's round) and then ``merge_``, the timed call. ``extra_info`` holds every round's
    seconds and the medians of the per-round ratios, ours / copy and ours / torch."""
    quick = request.config.getoption("--bench-quick")
    budget = request.config.getoption("--bench-budget")
    _current.clear()  # the K models of another case are freed first: K = 8 holds 4.5 GB
    gc.collect()
    rounds = kway.Rounds(k, quick=quick)
    start = time.perf_counter()
    rounds.others()
    rounds.ours()
    first = time.perf_counter() - start
    for times in rounds.result.seconds.values():
        times.clear()  # that round sized the run; it is not reported
    n = 3 if quick else min(15, max(5, int(3 * budget / max(first, 1e-9))))
    benchmark.group = f"merge{k}-gpt2-fp32-interleaved"
    benchmark.pedantic(rounds.ours, setup=rounds.others, rounds=n, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    rounds.result.seconds["swm:cpp"] = list(benchmark.stats.stats.data)
    benchmark.extra_info.update(interleaved=rounds.result.summary(), seconds=rounds.result.seconds,
                                merge_bytes=rounds.result.merge_bytes, copy_bytes=rounds.result.copy_bytes,
                                copy=rounds.copy_description, quick=quick)
