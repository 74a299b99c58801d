"""Benchmark cases, providers and timing, shared by the CPU suite (pytest-benchmark) and gpu.py.

A *case* is one op on one workload with one model dtype (``ema-gpt2-bf16``,
``merge8-gpt2-fp32``). A *provider* is one way to compute it: swm_fused with a
forced backend, or the best torch equivalent. Every provider of a case is
credited with the same byte count (the minimum traffic of docs/design.md), so GB/s
compares work done, not bytes moved.

Dtypes: EMA, SWA and SWAG keep fp32 averages of fp32 or bf16 models. Merges run
fp32 in / fp32 out, and bf16 in / bf16 out.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import swm_fused
from swm_fused import FlatBuffer, dispatch

from workloads import WORKLOADS, ParamList, numel, shrink

EMA_DECAY = 0.999
EMA2_DECAYS = (0.999, 0.9999)  # two post-hoc EMA profiles of one model (ema_multi_)
SWA_N_AVERAGED = 10
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
QUICK_MAX_NUMEL = 1 << 18  # dry runs keep each workload's leading tensors up to this many elements


class Unsupported(Exception):
    """A provider cannot run a case here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One op on one workload: ``op`` is ema, ema2 (two profiles), swa, swag or merge; ``k`` counts merged models."""

    op: str
    workload: str
    model_dtype: torch.dtype
    k: int = 0

    @property
    def average_dtype(self) -> torch.dtype:
        """Dtype of the written tensors: fp32 averages, merge outputs in the model dtype."""
        return self.model_dtype if self.op == "merge" else torch.float32

    @property
    def name(self) -> str:
        op = f"merge{self.k}" if self.op == "merge" else self.op
        return f"{op}-{self.workload}-{DTYPE_NAMES[self.model_dtype]}"

    @property
    def bytes_per_element(self) -> int:
        """docs/design.md's minimum traffic: read+write the average(s), read the source(s) once."""
        src = torch.empty((), dtype=self.model_dtype).element_size()
        avg = torch.empty((), dtype=self.average_dtype).element_size()
        if self.op in ("ema", "swa"):
            return 2 * avg + src
        if self.op == "ema2":  # the source read once for both profiles
            return 4 * avg + src
        if self.op == "swag":
            return 4 * avg + src
        return avg + self.k * src


def _common_cases() -> List[Case]:
    both = (torch.float32, torch.bfloat16)
    cases = [Case("ema", w, dt) for w in ("gpt2", "resnet50", "small20k") for dt in both]
    cases += [Case("ema2", "gpt2", dt) for dt in both]
    cases += [Case("swa", "gpt2", dt) for dt in both]
    cases += [Case("swag", w, dt) for w in ("gpt2", "small20k") for dt in both]
    cases += [Case("merge", "gpt2", dt, k) for k in (2, 4, 8) for dt in both]
    cases += [Case("merge", w, dt, 4) for w in ("resnet50", "small20k") for dt in both]
    return cases


def cpu_cases() -> List[Case]:
    """EMA on the GPT-2-like, ResNet-50-like and small-tensor lists; SWA, SWAG; merges with K = 2, 4, 8."""
    return _common_cases()


def gpu_cases() -> List[Case]:
    """The CPU cases plus the 1.3B GPT-like list: bf16-model EMA and a K=8 bf16 merge."""
    return _common_cases() + [Case("ema", "gpt1.3b", torch.bfloat16), Case("merge", "gpt1.3b", torch.bfloat16, 8)]


def workload_shapes(name: str, quick: bool = False) -> ParamList:
    """The workload's parameter shapes; ``quick`` cuts it to a few real tensors for dry runs."""
    shapes = WORKLOADS[name]()
    return shrink(shapes, QUICK_MAX_NUMEL) if quick else shapes


@dataclass
class CaseData:
    """The tensors of one case. Merge inputs are K distinct models (no aliasing, so no cache reuse)."""

    case: Case
    numel: int
    params: List[Tensor] = field(default_factory=list)  # ema/swa/swag: the model (source)
    avg: List[Tensor] = field(default_factory=list)  # ema/swa: the average; swag: the mean
    avg2: List[Tensor] = field(default_factory=list)  # ema2: the second profile
    sq_mean: List[Tensor] = field(default_factory=list)
    inputs: List[List[Tensor]] = field(default_factory=list)  # merge: K models
    out: List[Tensor] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes credited to one call of the op, whoever computes it."""
        return self.numel * self.case.bytes_per_element


def build_data(case: Case, shapes: ParamList, device: torch.device, seed: int = 0) -> CaseData:
    """Fresh random tensors for ``case`` on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(dtype: torch.dtype) -> List[Tensor]:
        return [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _, shape in shapes]

    data = CaseData(case, numel(shapes))
    if case.op == "merge":
        base = randn(case.model_dtype)
        # Scaled copies are cheaper to make than K rounds of randn, and just as distinct in memory.
        data.inputs = [base] + [torch._foreach_mul(base, 1.0 + 0.25 * k) for k in range(1, case.k)]
        data.out = [torch.empty_like(t) for t in base]
        total = case.k * (case.k + 1) / 2
        data.weights = [(k + 1) / total for k in range(case.k)]
    else:
        data.params = randn(case.model_dtype)
        data.avg = randn(case.average_dtype)
        if case.op == "ema2":
            data.avg2 = randn(case.average_dtype)
        if case.op == "swag":
            data.sq_mean = [t.square() for t in randn(case.average_dtype)]
    return data


def _lerp_weight(case: Case) -> float:
    return 1.0 - EMA_DECAY if case.op == "ema" else 1.0 / (SWA_N_AVERAGED + 1)


# ---------------------------------------------------------------- providers

Prepared = Callable[[], None]


@dataclass(frozen=True)
class Provider:
    """A way to compute some ops. ``prepare(case, data)`` returns the call to time or raises Unsupported.

    ``baselines`` names the providers this one is compared with, in order of
    preference (the first one measured in the same run is used). ``own_copy``: it
    averages into its own copy of the data (an AveragedModel, FlatBuffers), not into
    the CaseData's tensors.
    """

    name: str
    ops: Tuple[str, ...]
    prepare: Callable[[Case, CaseData], Prepared]
    baselines: Tuple[str, ...] = ()
    own_copy: bool = False


def _swm_ops(backend: str, flat: bool) -> Callable[[Case, CaseData], Prepared]:
    def prepare(case: Case, data: CaseData) -> Prepared:
        reason = dispatch.backend_status().get(backend, f"unknown backend {backend!r}")
        if reason:
            raise Unsupported(f"{backend}: {reason}")
        avg, src = data.avg, data.params
        if flat:  # one storage per list: a single kernel launch per call
            avg, src = FlatBuffer.from_tensors(avg), FlatBuffer.from_tensors(src)

        def run() -> None:
            with swm_fused.use_backend(backend):
                if case.op == "ema":
                    swm_fused.ema_(avg, src, EMA_DECAY)
                elif case.op == "ema2":
                    swm_fused.ema_multi_([data.avg, data.avg2], data.params, [1.0 - d for d in EMA2_DECAYS])
                elif case.op == "swa":
                    swm_fused.swa_(avg, src, SWA_N_AVERAGED)
                elif case.op == "swag":
                    swm_fused.swag_(data.avg, data.sq_mean, data.params, SWA_N_AVERAGED)
                else:
                    swm_fused.merge_(data.out, data.inputs, data.weights)

        return run

    return prepare


def _torch_foreach(case: Case, data: CaseData) -> Prepared:
    """``torch._foreach_lerp_``; a bf16 model is cast first (``p.float()``), as torch needs one dtype."""
    weight = _lerp_weight(case)
    dtype = case.average_dtype

    def sources() -> List[Tensor]:
        return [p.to(dtype) for p in data.params] if case.model_dtype != dtype else data.params

    if case.op == "swag":
        def run() -> None:
            src = sources()
            torch._foreach_lerp_(data.avg, src, weight)
            torch._foreach_lerp_(data.sq_mean, torch._foreach_mul(src, src), weight)
    elif case.op == "ema2":
        def run() -> None:
            src = sources()
            torch._foreach_lerp_(data.avg, src, 1.0 - EMA2_DECAYS[0])
            torch._foreach_lerp_(data.avg2, src, 1.0 - EMA2_DECAYS[1])
    else:
        def run() -> None:
            torch._foreach_lerp_(data.avg, sources(), weight)
    return run


def _swm_two_ema_calls(backend: str) -> Callable[[Case, CaseData], Prepared]:
    """ema2 as two separate ``ema_`` calls: the source read twice."""
    def prepare(case: Case, data: CaseData) -> Prepared:
        reason = dispatch.backend_status().get(backend, f"unknown backend {backend!r}")
        if reason:
            raise Unsupported(f"{backend}: {reason}")

        def run() -> None:
            with swm_fused.use_backend(backend):
                swm_fused.ema_(data.avg, data.params, EMA2_DECAYS[0])
                swm_fused.ema_(data.avg2, data.params, EMA2_DECAYS[1])
        return run
    return prepare


def _as_module(tensors: List[Tensor]) -> nn.Module:
    """A module whose parameters share storage with ``tensors``."""
    return nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


def _averaged_model(utils, case: Case, data: CaseData, **kwargs) -> Prepared:
    model = _as_module(data.params)
    avg_fn = utils.get_ema_multi_avg_fn(EMA_DECAY) if case.op == "ema" else None
    averaged = utils.AveragedModel(model, multi_avg_fn=avg_fn, **kwargs)
    averaged.update_parameters(model)  # the first call copies; the timed ones average
    return lambda: averaged.update_parameters(model)


def _torch_averaged_model(case: Case, data: CaseData) -> Prepared:
    if case.model_dtype != case.average_dtype:
        raise Unsupported("torch's AveragedModel cannot keep an fp32 average of a bf16 model "
                          "(its _foreach_lerp_ needs one dtype)")
    from torch.optim import swa_utils
    return _averaged_model(swa_utils, case, data)


def _swm_averaged_model(case: Case, data: CaseData) -> Prepared:
    """swm_fused's drop-in; ``dtype=`` keeps an fp32 average of a bf16 model."""
    try:
        from swm_fused import swa_utils
    except ImportError as exc:
        raise Unsupported(f"swm_fused.swa_utils is not importable: {exc}") from exc
    return _averaged_model(swa_utils, case, data, dtype=case.average_dtype)


def _torch_loop_merge(case: Case, data: CaseData) -> Prepared:
    """``out = w0 * t0``, then ``out += w_k * t_k`` for each further model (one pass per model)."""
    out, inputs, weights = data.out, data.inputs, data.weights

    def run() -> None:
        for o, t in zip(out, inputs[0]):
            torch.mul(t, weights[0], out=o)
        for tensors, w in zip(inputs[1:], weights[1:]):
            torch._foreach_add_(out, tensors, alpha=w)
    return run


def _torch_stack_merge(case: Case, data: CaseData) -> Prepared:
    """mergekit's linear merge, per tensor: ``(w * torch.stack(ts)).sum(0)`` in the model dtype."""
    out, inputs = data.out, data.inputs
    w = torch.tensor(data.weights, dtype=case.model_dtype, device=out[0].device)
    w_by_ndim = {t.dim(): w.view(-1, *([1] * t.dim())) for t in out}

    def run() -> None:
        for i, o in enumerate(out):
            torch.sum(w_by_ndim[o.dim()] * torch.stack([model[i] for model in inputs]), dim=0, out=o)
    return run


LERP_OPS = ("ema", "swa")
ALL_OPS = ("ema", "ema2", "swa", "swag", "merge")
DEVICE_BACKENDS = {"cpu": ("reference", "cpp"), "cuda": ("cuda", "triton")}


def providers(device_type: str) -> List[Provider]:
    """Every provider for ``device_type``, torch baselines first (so speed-ups can be computed as we go).

    swm_fused runs once per backend that can run on the device: reference and cpp
    on CPU; cuda and triton on CUDA (the Triton interpreter is not benchmarked).
    """
    result = [
        Provider("torch:foreach", ("ema", "ema2", "swa", "swag"), _torch_foreach),
        Provider("torch:AveragedModel", LERP_OPS, _torch_averaged_model, baselines=("torch:foreach",),
                 own_copy=True),
        Provider("torch:loop", ("merge",), _torch_loop_merge),
        Provider("torch:stack", ("merge",), _torch_stack_merge, baselines=("torch:loop",)),
    ]
    for backend in DEVICE_BACKENDS[device_type]:
        result.append(Provider(f"swm:{backend}", ALL_OPS, _swm_ops(backend, flat=False),
                               baselines=("torch:foreach", "torch:loop")))
        result.append(Provider(f"swm:{backend}:flat", ("ema",), _swm_ops(backend, flat=True),
                               baselines=("torch:foreach",), own_copy=True))
        result.append(Provider(f"swm:{backend}:2x-ema_", ("ema2",), _swm_two_ema_calls(backend),
                               baselines=("torch:foreach",)))
    result.append(Provider("swm:AveragedModel", LERP_OPS, _swm_averaged_model,
                           baselines=("torch:AveragedModel", "torch:foreach"), own_copy=True))
    return result


def pairs(cases: Sequence[Case], provider_list: Sequence[Provider]) -> List[Tuple[Case, Provider]]:
    """(case, provider) in run order: case by case, each case's providers in list order."""
    return [(c, p) for c in cases for p in provider_list if c.op in p.ops]


def speedup(provider: Provider, case_medians: Dict[str, float], median: float) -> Tuple[Optional[str], Optional[float]]:
    """(baseline name, baseline median / ``median``) against the first of ``provider.baselines`` measured."""
    for name in provider.baselines:
        if name in case_medians:
            return name, case_medians[name] / median
    return None, None


# ---------------------------------------------------------------- the copy ceiling

def copy_ceiling(device: torch.device, numel_: int = 1 << 26) -> Tuple[Prepared, int, str]:
    """(call, bytes per call, description) of the bandwidth ceiling on ``device``.

    CPU: an in-place ``add_`` of two large fp32 tensors (12 B/elem), the closest
    plain torch analogue of an in-place average. GPU: a device-to-device copy (8 B/elem).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(numel_, generator=gen, device=device)
    b = torch.randn(numel_, generator=gen, device=device)
    if device.type == "cpu":
        return (lambda: a.add_(b)), 12 * numel_, f"in-place add_ of two {numel_ >> 20}M-element fp32 tensors"
    return (lambda: a.copy_(b)), 8 * numel_, f"device-to-device copy of {numel_ >> 20}M fp32 elements"


def time_calls(calls: Sequence[Prepared], device: torch.device, budget_s: float = 1.0,
               min_reps: int = 5, max_reps: int = 100) -> float:
    """Median seconds per call: each of ``calls`` runs once to warm up, then they take turns.

    Taking turns over several calls on separate buffer sets (rotating buffers)
    keeps a small case from being served out of a warm cache. The number of timed
    calls fits ``budget_s``, within [min_reps, max_reps]. CUDA calls are timed with
    CUDA events, CPU calls with ``time.perf_counter``.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for call in calls:
        call()
    sync()
    start = time.perf_counter()
    calls[0]()
    sync()
    estimate = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, budget_s / max(estimate, 1e-9))))
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            calls[i % len(calls)]()
            end.record()
        sync()
        return statistics.median(begin.elapsed_time(end) / 1e3 for begin, end in events)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
