"""GPU benchmark: the CPU suite's cases on CUDA, plus a 1.3B GPT-like list, as one markdown table.

    python bench/gpu.py --out bench/results/gpu-$(date +%F).md

Compares swm_fused's cuda and triton backends with the torch equivalents, side
by side, in one run. Each call is timed with CUDA events (median of many, after
a warm-up); cases smaller than a few L2 caches rotate through several buffer
sets so that L2 does not flatter them. GB/s uses docs/design.md's byte counts, the
ceiling is a device-to-device copy measured in the same run.

Without a GPU, ``--device cpu --quick`` runs every code path on tiny workloads
with the CPU backends (a dry run whose numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import pathlib
import platform
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

try:
    import swm_fused
except ImportError:  # not installed: benchmark this checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import swm_fused

from cases import Case, Unsupported, build_data, copy_ceiling, cpu_cases, gpu_cases, pairs, providers, speedup, \
    time_calls, workload_shapes
from report import CPU_TARGETS, GPU_TARGETS, Record, markdown_table, targets_table

ROTATE_CACHE_MULTIPLE = 4  # buffer sets hold at least this many last-level caches' worth of bytes
MAX_BUFFER_SETS = 8
CPU_CACHE_STAND_IN = 32 << 20  # --device cpu: a nominal last-level cache size, so rotation runs in dry runs


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return CPU_CACHE_STAND_IN


def buffer_sets(nbytes: int, cache_bytes: int) -> int:
    """How many independent copies of a case to rotate through so that each call starts with a cold cache."""
    return max(1, min(MAX_BUFFER_SETS, math.ceil(ROTATE_CACHE_MULTIPLE * cache_bytes / max(nbytes, 1))))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, quick: bool, budget_s: float, min_reps: int,
             copy_gbps: float) -> Tuple[List[Record], List[Tuple[str, str, str]]]:
    """Time every provider of ``case``; return (records, [(case, provider, why not run)])."""
    shapes = workload_shapes(case.workload, quick)
    first = build_data(case, shapes, device, seed=0)
    sets = [first] + [build_data(case, shapes, device, seed=i)
                      for i in range(1, buffer_sets(first.nbytes, _cache_bytes(device)))]
    records: List[Record] = []
    not_run: List[Tuple[str, str, str]] = []
    medians: Dict[str, float] = {}
    for _, provider in pairs([case], providers(device.type)):
        error = None
        try:
            calls = [provider.prepare(case, data) for data in sets]
            median = time_calls(calls, device, budget_s=budget_s, min_reps=min_reps, max_reps=200)
        except Unsupported as exc:
            error = str(exc)
        except Exception as exc:  # one failing provider (a kernel bug, OOM) must not lose the whole run
            error = f"FAILED: {type(exc).__name__}: {exc}"
        calls = None  # frees this provider's state (averaged copies, flat buffers) before the next one
        if error is not None:
            not_run.append((case.name, provider.name, error))
            _free(device)
            continue
        medians[provider.name] = median
        baseline, ratio = speedup(provider, medians, median)
        gbps = first.nbytes / median / 1e9
        records.append(Record(case.name, provider.name, median, gbps, baseline, ratio, gbps / copy_gbps))
        print(f"  {case.name:<22} {provider.name:<22} {median * 1e3:10.3f} ms {gbps:8.1f} GB/s", file=sys.stderr)
    del sets, first
    _free(device)
    return records, not_run


def _header(device: torch.device, ceiling: Tuple[str, float], quick: bool, budget_s: float) -> List[str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        l2_mib = torch.cuda.get_device_properties(device).L2_cache_size >> 20
        machine = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, {l2_mib} MiB L2"
    else:
        machine = f"CPU dry run ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {machine}",
        f"- torch {torch.__version__}, triton {triton_version}, swm_fused {swm_fused.__version__}, "
        f"backends: {', '.join(swm_fused.available_backends())}",
        f"- copy ceiling: {ceiling[0]}: **{ceiling[1]:.1f} GB/s**, measured in this run",
        f"- timing: {'CUDA events' if device.type == 'cuda' else 'perf_counter'}, median of calls fitting "
        f"{budget_s:g} s per provider after a warm-up; cases under {ROTATE_CACHE_MULTIPLE}x the cache rotate "
        "through separate buffer sets",
    ]
    if quick:
        lines.append("- **--quick run: tiny workloads, the numbers mean nothing**")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu runs the CPU backends, for dry runs with --quick")
    parser.add_argument("--quick", action="store_true", help="tiny workloads: checks that every path runs")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per provider (default 0.5; 0.02 with --quick)")
    parser.add_argument("-k", "--cases", nargs="*", default=None,
                        help="run only cases whose name contains one of these strings (e.g. gpt1.3b merge8)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"gpu.py: CUDA is not available ({why}; torch {torch.__version__}). Run it on a CUDA machine, "
              "or use `--device cpu --quick` for a dry run of the code paths.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    budget_s = args.budget if args.budget is not None else (0.02 if args.quick else 0.5)
    min_reps = 3 if args.quick else 10
    cases = gpu_cases() if device.type == "cuda" else cpu_cases()
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
    targets = GPU_TARGETS if device.type == "cuda" else CPU_TARGETS

    ceiling_numel = 1 << 20 if args.quick else (1 << 28 if device.type == "cuda" else 1 << 26)
    call, nbytes, description = copy_ceiling(device, numel_=ceiling_numel)
    copy_gbps = nbytes / time_calls([call], device, budget_s=budget_s, min_reps=min_reps) / 1e9
    del call
    _free(device)
    print(f"copy ceiling: {description}: {copy_gbps:.1f} GB/s", file=sys.stderr)

    records: List[Record] = []
    not_run: List[Tuple[str, str, str]] = []
    for case in cases:
        case_records, case_not_run = run_case(case, device, args.quick, budget_s, min_reps, copy_gbps)
        records += case_records
        not_run += case_not_run

    title = "# swm_fused GPU benchmarks" if device.type == "cuda" else "# swm_fused benchmarks (gpu.py dry run on CPU)"
    lines = [title, "", *_header(device, (description, copy_gbps), args.quick, budget_s), "",
             "GB/s counts docs/design.md's minimum bytes for every provider of a case (EMA/SWA 12 B/elem for fp32 "
             "models, 10 for bf16; SWAG 20/18; K-way merge (K+1) x element size, fp32 in/out or bf16 in/out). "
             "Speed-up is over the torch baseline named in `over`, measured in the same run.", "",
             markdown_table(records) if records else "(nothing measured)", "",
             "## Targets (issue 5, section 3)" if device.type == "cuda" else "## Targets (issue 5, section 2)", "",
             targets_table(records, targets), ""]
    if not_run:
        grouped: Dict[Tuple[str, str], List[str]] = {}
        for case_name, provider_name, why in not_run:
            grouped.setdefault((provider_name, why), []).append(case_name)
        lines += ["## Not run", "", "| provider | why | cases |", "|---|---|---|"]
        lines += [f"| {p} | {why} | {', '.join(names)} |" for (p, why), names in grouped.items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
