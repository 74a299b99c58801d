"""Host time of ``WeightAverager.update()`` against timm-style ``torch._foreach_lerp_`` (issue 10, section 4).

The models are stacks of ``nn.Linear`` (2 tensors each). Two widths per tensor count:

- ``tiny``: ``Linear(2, 2)``, so kernel time is negligible and the time is host time;
- ``table``: the widths of the issue's table (43K, 552K, 624K and 560K parameters), where the
  kernels' time is part of the figure.

Providers, each over its own model (a flattened model must not be shared: a ``p.detach()`` elsewhere
is one more reference to its storage, and the averager then, correctly, stops trusting the layout):

- ``foreach_lerp``: ``torch._foreach_lerp_(ema, params, 1 - decay)``, timm ``ModelEmaV3`` with
  foreach, no NaN check;
- ``averager`` / ``averager-flat``: ``WeightAverager(model, mode="ema").update()`` on per-tensor
  lists / on a ``flatten_parameters`` model, NaN/Inf check included;
- ``bound`` / ``bound-flat``: the same update's one C++ call alone (``swm_fused._C.bound_step``
  through the engine's binding): the part of ``update()`` that is not Python. On ``tiny`` models it
  is mostly per-tensor validation and staging; ``update() - bound`` is the Python part.

``python bench/host_time.py`` runs every provider interleaved, round after round, and prints medians
and the median of per-round ratios (the way to read a loaded machine); ``bench/test_bench_engine.py``
runs the same cases under pytest-benchmark.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

try:
    import swm_fused
except ImportError:  # not installed: this checkout
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import swm_fused

TENSORS = (40, 2000, 8000, 20000)
# Linear width of the table (tensors -> params: 40 -> 43,240; 2,000 -> 552,000; 8,000 -> 624,000;
# 20,000 -> 560,000), and the tiny width that leaves host time alone.
TABLE_WIDTH = {40: 46, 2000: 23, 8000: 12, 20000: 7}
WIDTHS = {"tiny": lambda tensors: 2, "table": lambda tensors: TABLE_WIDTH[tensors]}
PROVIDERS = ("foreach_lerp", "averager", "averager-flat", "bound", "bound-flat")
DECAY = 0.999


def target_us(tensors: int, flat: bool) -> float:
    """Issue 10's host-time target: 25 us flattened, 25 us + 0.5 us per tensor otherwise."""
    return 25.0 if flat else 25.0 + 0.5 * tensors


def linear_stack(tensors: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(tensors // 2)])


def make_call(provider: str, tensors: int, width: int) -> Tuple[Callable[[], object], int]:
    """(one update of ``provider``, parameter count), on a fresh model; the first update is done."""
    model = linear_stack(tensors, width)
    numel = sum(p.numel() for p in model.parameters())
    if provider == "foreach_lerp":  # timm ModelEmaV3 with foreach: lerp the EMA's tensors toward the model's
        ema = [p.detach().clone() for p in model.parameters()]
        params = [p.detach() for p in model.parameters()]

        def lerp() -> None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - DECAY)
        return lerp, numel
    if provider.endswith("flat"):
        swm_fused.flatten_parameters(model)
    averager = swm_fused.WeightAverager(model, mode="ema", decay=DECAY)
    averager.update()  # the first update copies, and binds the step
    averager.update()
    if provider.startswith("averager"):
        return averager.update, numel
    fast = averager.engine._fast
    if fast is None:
        raise RuntimeError("no bound step (is the compiled cpp backend available?)")
    call, key, weight, engine = fast.call, fast.key, 1.0 - DECAY, averager.engine

    def bound() -> int:
        return call(key, weight, engine.skip_nonfinite)
    if bound() != 0:
        raise RuntimeError(f"{provider}: the bound step refused to run (stale binding)")
    return bound, numel


def _median_call_us(call: Callable[[], object], calls: int) -> float:
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1e3


def interleaved(tensors: int, width: str, rounds: int, budget_s: float) -> Dict[str, object]:
    """Every provider on one shape, interleaved: each round times each provider (median of a few calls)."""
    calls = {p: make_call(p, tensors, WIDTHS[width](tensors)) for p in PROVIDERS}
    numel = calls["averager"][1]
    per_round: Dict[str, List[float]] = {p: [] for p in PROVIDERS}
    probe = {p: _median_call_us(calls[p][0], 3) for p in PROVIDERS}
    for _ in range(rounds):
        for p in PROVIDERS:
            n = max(3, min(200, int(budget_s / rounds * 1e6 / len(PROVIDERS) / max(probe[p], 1e-3))))
            per_round[p].append(_median_call_us(calls[p][0], n))
    ratio = [f / a for f, a in zip(per_round["foreach_lerp"], per_round["averager"])]
    ratio_flat = [f / a for f, a in zip(per_round["foreach_lerp"], per_round["averager-flat"])]
    return {"tensors": tensors, "width": width, "numel": numel,
            "median_us": {p: statistics.median(v) for p, v in per_round.items()},
            "foreach_over_averager": statistics.median(ratio),
            "foreach_over_averager_flat": statistics.median(ratio_flat)}


def verdict(us: float, target: float) -> str:
    return "met" if us <= target else "**not met**"


def fmt_us(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.1f} µs"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, nargs="*", default=list(TENSORS))
    parser.add_argument("--widths", nargs="*", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timed calls per shape")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average before: "
          f"{' '.join(load_before)}; {args.rounds} interleaved rounds per shape\n")
    print("| model | tensors | params | timm-style `_foreach_lerp_` | `update()` lists | C++ call (lists) | "
          "`update()` flattened | C++ call (flat) | lists: target | flat: target | "
          "median ratio foreach / lists | median ratio foreach / flat |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for width in args.widths:
        for tensors in args.tensors:
            r = interleaved(tensors, width, args.rounds, args.budget)
            m = r["median_us"]
            if width == "tiny":  # the targets are host time: kernel time negligible
                lists = f"{fmt_us(target_us(tensors, False))}: " + verdict(m["averager"], target_us(tensors, False))
                flat = "25 µs: " + verdict(m["averager-flat"], target_us(tensors, True))
            else:
                lists = flat = "(kernels included)"
            print(f"| {width} | {tensors:,} | {r['numel']:,} | {fmt_us(m['foreach_lerp'])} | {fmt_us(m['averager'])} | "
                  f"{fmt_us(m['bound'])} | {fmt_us(m['averager-flat'])} | {fmt_us(m['bound-flat'])} | {lists} | "
                  f"{flat} | {r['foreach_over_averager']:.2f}x | {r['foreach_over_averager_flat']:.2f}x |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\nload average after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
