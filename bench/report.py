"""Turn a pytest-benchmark JSON from ``bench/`` into a markdown table and a PNG bar chart.

    python bench/report.py BENCH_JSON [--out-md FILE] [--out-png FILE]

The markdown (also printed) has one row per case and provider: median time,
GB/s (docs/design.md's byte counts, the same for every provider of a case), the
speed-up over the case's torch baseline, and the fraction of the copy bandwidth
measured in the same run; then the issue's CPU targets, met or missed. The chart
shows GB/s per case and provider, with the copy ceiling as a dashed line.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

@dataclass(frozen=True)
class Target:
    """On ``case``, the best of the ``ours`` providers runs ``min_speedup`` x faster than ``baseline``
    (and reaches ``min_fraction`` of the copy bandwidth, when given)."""

    label: str
    case: str
    ours: Tuple[str, ...]
    baseline: str
    min_speedup: float
    min_fraction: Optional[float] = None


# CPU: the cpp kernels, which dispatch always picks when built. GPU: the faster of cuda and triton,
# which is what dispatch picks there.
CPU_TARGETS = [
    Target("fp32 EMA, GPT-2-like list", "ema-gpt2-fp32", ("swm:cpp",), "torch:foreach", 1.0, 0.85),
    Target("bf16 model, fp32 EMA, GPT-2-like list", "ema-gpt2-bf16", ("swm:cpp",), "torch:foreach", 1.6),
    Target("K=8 fp32 merge, GPT-2-like list", "merge8-gpt2-fp32", ("swm:cpp",), "torch:loop", 1.7),
    Target("20,000 small tensors, fp32 EMA", "ema-small20k-fp32", ("swm:cpp",), "torch:foreach", 4.0),
    Target("drop-in AveragedModel.update_parameters, GPT-2-like list", "ema-gpt2-fp32", ("swm:AveragedModel",),
           "torch:AveragedModel", 1.5),
]

GPU_TARGETS = [
    Target("EMA, 1.3B GPT-like list, bf16 model, fp32 average", "ema-gpt1.3b-bf16", ("swm:cuda", "swm:triton"),
           "torch:foreach", 2.0, 0.90),
    Target("K=8 bf16 merge, 1.3B GPT-like list", "merge8-gpt1.3b-bf16", ("swm:cuda", "swm:triton"), "torch:loop", 2.5),
    Target("20,000 small tensors, fp32 EMA", "ema-small20k-fp32", ("swm:cuda", "swm:triton"), "torch:foreach", 3.0),
]


@dataclass
class Record:
    """One measured (case, provider)."""

    case: str
    provider: str
    median_s: float
    gbps: float
    baseline: Optional[str]
    speedup: Optional[float]
    copy_fraction: float


def load_records(bench: dict) -> List[Record]:
    """The records of a pytest-benchmark JSON (benchmarks without our extra_info are ignored)."""
    records = []
    for b in bench["benchmarks"]:
        info = b.get("extra_info", {})
        if "case" not in info:
            continue
        records.append(Record(info["case"], info["provider"], info["median_s"], info["gbps"],
                              info["baseline"], info["speedup"], info["copy_fraction"]))
    return records


def _cpu_header(bench: dict) -> List[str]:
    machine = bench["machine_info"]
    cpu = machine.get("cpu", {})
    ceiling = machine.get("copy_ceiling")
    lines = [
        f"- date: {bench['datetime']}",
        f"- machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} logical CPUs, "
        f"{machine.get('system', '')} {machine.get('release', '')}",
        f"- torch {machine.get('torch', '?')} ({machine.get('torch_threads', '?')} threads), "
        f"swm_fused {machine.get('swm_fused', '?')}, backends: {', '.join(machine.get('swm_fused_backends', []))}",
    ]
    if ceiling:
        lines.append(f"- copy ceiling: {ceiling['description']}: **{ceiling['gbps']:.1f} GB/s** (12 B/elem), "
                     "measured in this run")
    if machine.get("bench_quick"):
        lines.append("- **--bench-quick run: tiny workloads, the numbers mean nothing**")
    return lines


def markdown_table(records: Sequence[Record]) -> str:
    """One row per (case, provider); the fastest provider of each case in bold."""
    rows = ["| case | provider | median (ms) | GB/s | speed-up | over | % of copy BW |",
            "|---|---|---:|---:|---:|---|---:|"]
    best = {}
    for r in records:
        if r.case not in best or r.median_s < best[r.case]:
            best[r.case] = r.median_s
    for r in records:
        name = f"**{r.provider}**" if r.median_s == best[r.case] else r.provider
        ratio = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        rows.append(f"| {r.case} | {name} | {r.median_s * 1e3:.3f} | {r.gbps:.1f} | {ratio} | "
                    f"{r.baseline or ''} | {100 * r.copy_fraction:.0f}% |")
    return "\n".join(rows)


def targets_table(records: Sequence[Record], targets: Sequence[Target]) -> str:
    """Each target met or missed: the best of its providers against its baseline, measured side by side."""
    rows = ["| target | case | ours | needed | measured | met |", "|---|---|---|---|---|---|"]
    for t in targets:
        measured: Dict[str, Record] = {r.provider: r for r in records if r.case == t.case}
        ours = [measured[p] for p in t.ours if p in measured]
        needed = f">= {t.min_speedup:g}x {t.baseline}" + (
            f", >= {100 * t.min_fraction:.0f}% of copy BW" if t.min_fraction is not None else "")
        if not ours or t.baseline not in measured:
            missing = t.baseline if ours else "/".join(t.ours)
            rows.append(f"| {t.label} | {t.case} | | {needed} | not measured ({missing}) | |")
            continue
        best = max(ours, key=lambda r: r.gbps)
        ratio = measured[t.baseline].median_s / best.median_s
        met = ratio >= t.min_speedup and (t.min_fraction is None or best.copy_fraction >= t.min_fraction)
        got = f"{ratio:.2f}x, {100 * best.copy_fraction:.0f}% of copy BW"
        rows.append(f"| {t.label} | {t.case} | {best.provider} | {needed} | {got} | {'yes' if met else 'NO'} |")
    return "\n".join(rows)


def interleaved_table(bench: dict) -> str:
    """bench/test_bench_ops.py::test_merge_interleaved: the K-way fp32 merge, the torch loop and the copy
    ceiling timed in turn, round after round; medians over rounds of GB/s and of the per-round ratios."""
    rows = []
    for b in bench["benchmarks"]:
        s = b.get("extra_info", {}).get("interleaved")
        if s:
            rows.append(f"| {s['k']} | {s['rounds']} | {s['copy_gbps']:.1f} | {s['torch_gbps']:.1f} | "
                        f"{s['ours_gbps']:.1f} | {100 * s['ours_over_copy']:.0f}% | {s['ours_over_torch']:.2f}x |")
    if not rows:
        return ""
    return "\n".join([
        "## K-way fp32 merge against the copy ceiling, interleaved rounds", "",
        "Each round times the copy ceiling, the torch loop and swm:cpp one after the other (bench/kway.py); "
        "ratios are medians of the per-round ratios. Merge bytes 4(K+1) per element, copy 12.", "",
        "| K | rounds | copy GB/s | torch:loop GB/s | swm:cpp GB/s | swm:cpp / copy | swm:cpp / torch:loop |",
        "|---:|---:|---:|---:|---:|---:|---:|", *rows, ""])


def render_markdown(bench: dict, records: Sequence[Record]) -> str:
    return "\n".join([
        "# swm_fused CPU benchmarks", "", *_cpu_header(bench), "",
        "GB/s counts docs/design.md's minimum bytes for every provider of a case (EMA/SWA 12 B/elem for fp32 "
        "models, 10 for bf16; SWAG 20/18; K-way merge (K+1) x element size, fp32 in/out or bf16 in/out), so "
        "it compares work done. Speed-up is over the torch baseline named in `over`, measured in the same run.",
        "", markdown_table(records), "", "## Targets (issue 5, section 2)", "",
        targets_table(records, CPU_TARGETS), "", interleaved_table(bench),
    ])


def plot(records: Sequence[Record], copy_gbps: Optional[float], path: str, title: str) -> None:
    """Horizontal bars of GB/s, one group per case, one colour per provider; lerp ops and merges side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in records))
    panels = [[c for c in cases if not c.startswith("merge")], [c for c in cases if c.startswith("merge")]]
    panels = [p for p in panels if p]
    names = sorted(dict.fromkeys(r.provider for r in records), key=lambda n: not n.startswith("torch"))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    by_case: Dict[str, List[Record]] = {}
    for r in records:
        by_case.setdefault(r.case, []).append(r)
    bars_per_panel = [sum(len(by_case[c]) + 1 for c in p) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 1.5 + 0.19 * max(bars_per_panel)),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        y, ticks = 0, []
        for case in panel:
            group = sorted(by_case[case], key=lambda r: names.index(r.provider))
            ticks.append((y + (len(group) - 1) / 2, case))
            for r in group:
                hatch = "//" if r.provider.startswith("torch") else None
                ax.barh(y, r.gbps, color=colours[r.provider], hatch=hatch, edgecolor="white", height=0.9)
                ax.text(r.gbps, y, f" {r.gbps:.1f}", va="center", fontsize=6)
                y += 1
            y += 1
        ax.set_yticks([t for t, _ in ticks], [c for _, c in ticks], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (minimum bytes of the op / median time)")
        if copy_gbps:
            ax.axvline(copy_gbps, color="black", linestyle="--", linewidth=1)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n], hatch="//" if n.startswith("torch") else None)
               for n in names]
    labels = list(names)
    if copy_gbps:
        handles.append(plt.Line2D([0], [0], color="black", linestyle="--"))
        labels.append(f"copy ceiling {copy_gbps:.1f} GB/s")
    fig.suptitle(title, fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.9 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", help="a pytest-benchmark JSON (pytest bench/ --benchmark-json FILE)")
    parser.add_argument("--out-md", help="write the markdown here too")
    parser.add_argument("--out-png", help="write the bar chart here")
    args = parser.parse_args(argv)
    with open(args.bench_json) as f:
        bench = json.load(f)
    records = load_records(bench)
    if not records and interleaved_table(bench):  # only test_merge_interleaved ran
        text = "\n".join(["# swm_fused CPU benchmarks", "", *_cpu_header(bench), "", interleaved_table(bench)])
        print(text)
        if args.out_md:
            with open(args.out_md, "w") as f:
                f.write(text)
        return 0
    if not records:
        print(f"report.py: {args.bench_json} holds no swm_fused benchmark results "
              "(was it written by `pytest bench/ --benchmark-json`?)", file=sys.stderr)
        return 1
    text = render_markdown(bench, records)
    print(text)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(text)
    if args.out_png:
        ceiling = bench["machine_info"].get("copy_ceiling", {}).get("gbps")
        cpu = bench["machine_info"].get("cpu", {})
        title = (f"swm_fused CPU benchmarks, {bench['datetime'][:10]}, {cpu.get('brand_raw', '')} "
                 f"({cpu.get('count', '?')} CPUs), torch {bench['machine_info'].get('torch', '')}")
        plot(records, ceiling, args.out_png, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
