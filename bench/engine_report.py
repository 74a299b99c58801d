"""Markdown table of a bench/test_bench_engine.py run: ``python bench/engine_report.py RUN.json > OUT.md``."""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def main(path: str) -> None:
    data = json.load(open(path))
    machine = data["machine_info"]
    rows = defaultdict(dict)
    numel = {}
    threads = defaultdict(set)  # host cases run with their own thread count (bench/test_bench_engine.py)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[(info["group"], info["tensors"])][info["provider"]] = info["median_s"]
        numel[(info["group"], info["tensors"])] = info["numel"]
        if "threads" in info:
            threads[info["group"]].add(info["threads"])
    print(f"# Averaging front-ends: host overhead ({data['datetime'][:10]})\n")
    print(f"- machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} "
          f"logical CPUs; torch {machine.get('torch')}, {machine.get('torch_threads')} threads at start; "
          f"swm_fused {machine.get('swm_fused')} ({', '.join(machine.get('swm_fused_backends', []))})")
    if machine.get("bench_quick"):
        print("- **--bench-quick run: the numbers mean nothing**")
    print("- medians of pytest-benchmark rounds, all cases in one run\n")
    if any(group.startswith("dropin") for group, _ in rows):
        print("## Drop-in `AveragedModel.update_parameters`\n")
        print("| update | tensors | params | torch | swm_fused | speed-up |")
        print("|---|---:|---:|---:|---:|---:|")
    for (group, tensors), medians in sorted(rows.items()):
        if not group.startswith("dropin"):
            continue
        t, o = medians.get("torch"), medians.get("swm_fused")
        kind = "EMA (`get_ema_multi_avg_fn`)" if group.endswith("ema") else "default SWA"
        print(f"| {kind} | {tensors:,} | {numel[(group, tensors)]:,} | {fmt(t) if t else '-'} | "
              f"{fmt(o) if o else '-'} | {t / o:.2f}x |" if t and o else "")
    for width, title in (("tiny", "tiny tensors: kernel time negligible, so this is host time"),
                         ("table", "the issue's table widths: kernels included")):
        group = f"host-{width}"
        cases = sorted((t, m) for (g, t), m in rows.items() if g == group)
        if not cases:
            continue
        count = ", ".join(str(t) for t in sorted(threads[group])) or "?"
        print(f"\n## `WeightAverager.update()` ({title}), {count} thread(s)\n")
        print("| tensors | params | timm-style `_foreach_lerp_` | `update()` lists | its C++ call | "
              "`update()` flattened | its C++ call | target lists / flattened |")
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
        for tensors, medians in cases:
            cells = [fmt(medians[p]) if p in medians else "-"
                     for p in ("foreach_lerp", "averager", "bound", "averager-flat", "bound-flat")]
            if width == "tiny":
                lists_target, flat_target = 25e-6 + 0.5e-6 * tensors, 25e-6
                verdict = [("met" if medians.get(p, 1.0) <= t else "**not met**")
                           for p, t in (("averager", lists_target), ("averager-flat", flat_target))]
                target = f"{fmt(lists_target)} {verdict[0]} / 25 µs {verdict[1]}"
            else:
                target = "(kernels included)"
            print(f"| {tensors:,} | {numel[(group, tensors)]:,} | " + " | ".join(cells) + f" | {target} |")


if __name__ == "__main__":
    main(sys.argv[1])
