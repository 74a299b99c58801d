"""Checks of the benchmark machinery itself (no timing): providers do the op they are credited with,
report.py renders what it is given, and gpu.py's dry run covers every case and provider.

Run: ``pytest bench/test_bench_tools.py -q`` (``--benchmark-only`` skips these, as they time nothing).
"""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

import gpu
import report
from cases import EMA2_DECAYS, SWA_N_AVERAGED, EMA_DECAY, Unsupported, build_data, cpu_cases, pairs, providers, workload_shapes

CPU = torch.device("cpu")
# Providers that average into their own copy (AveragedModel, FlatBuffer) are checked by the package's tests.
CHECKED = [(c, p) for c, p in pairs(cpu_cases(), providers("cpu")) if not p.own_copy]


def _expected(case, data):
    """What one call must leave behind, in float64: [(tensor written, expected value)]."""
    def f64(tensors):
        return [t.double() for t in tensors]

    if case.op == "merge":
        expected = [sum(w * t for w, t in zip(data.weights, ts)) for ts in zip(*[f64(x) for x in data.inputs])]
        return list(zip(data.out, expected))
    src = f64(data.params)
    if case.op == "ema2":
        return [(a, a64 + (1 - d) * (s - a64)) for avg, d in zip((data.avg, data.avg2), EMA2_DECAYS)
                for a, a64, s in zip(avg, f64(avg), src)]
    weight = 1 - EMA_DECAY if case.op == "ema" else 1 / (SWA_N_AVERAGED + 1)
    written = [(a, a64 + weight * (s - a64)) for a, a64, s in zip(data.avg, f64(data.avg), src)]
    if case.op == "swag":
        written += [(q, q64 + weight * (s * s - q64)) for q, q64, s in zip(data.sq_mean, f64(data.sq_mean), src)]
    return written


@pytest.mark.parametrize(("case", "provider"), CHECKED, ids=[f"{c.name}-{p.name}" for c, p in CHECKED])
def test_provider_computes_the_op(case, provider):
    data = build_data(case, workload_shapes(case.workload, quick=True), CPU, seed=random.randrange(1 << 30))
    try:
        run = provider.prepare(case, data)
    except Unsupported as exc:
        pytest.skip(str(exc))
    expected = _expected(case, data)
    for out in data.out:
        out.fill_(float("nan"))  # fully overwritten by a merge
    run()
    for i, (got, want) in enumerate(expected):
        if got.dtype == torch.bfloat16:  # one rounding per model for torch's bf16 loop
            atol = (case.k + 1) * 2.0 ** -8 * want.abs().max().item()
        else:
            atol = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol, msg=lambda m: f"tensor {i}: {m}")


def _fake_bench(rng: random.Random):
    """A pytest-benchmark JSON with random medians for two CPU target cases.

    Returns (json, medians by (case, provider), copy GB/s, bytes per case).
    """
    medians = {
        ("ema-gpt2-fp32", "torch:foreach"): rng.uniform(0.05, 0.2),
        ("ema-gpt2-fp32", "swm:cpp"): rng.uniform(0.05, 0.2),
        ("ema-gpt2-fp32", "torch:AveragedModel"): rng.uniform(0.1, 0.4),
        ("ema-gpt2-fp32", "swm:AveragedModel"): rng.uniform(0.05, 0.2),
        ("merge8-gpt2-fp32", "torch:loop"): rng.uniform(0.3, 0.9),
        ("merge8-gpt2-fp32", "swm:cpp"): rng.uniform(0.1, 0.6),
    }
    copy_gbps = rng.uniform(10, 40)
    nbytes = {"ema-gpt2-fp32": 12 * 124439808, "merge8-gpt2-fp32": 36 * 124439808}
    baselines = {"swm:cpp": ("torch:foreach", "torch:loop"), "torch:AveragedModel": ("torch:foreach",),
                 "swm:AveragedModel": ("torch:AveragedModel",)}
    benchmarks = []
    for (case, provider), median in medians.items():
        base = next((b for b in baselines.get(provider, ()) if (case, b) in medians), None)
        gbps = nbytes[case] / median / 1e9
        benchmarks.append({"group": case, "stats": {"median": median}, "extra_info": {
            "case": case, "provider": provider, "median_s": median, "gbps": gbps, "baseline": base,
            "speedup": medians[(case, base)] / median if base else None, "copy_fraction": gbps / copy_gbps}})
    bench = {"datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks, "machine_info": {
        "cpu": {"brand_raw": "test CPU", "count": 2}, "torch": torch.__version__,
        "copy_ceiling": {"description": "add_", "gbps": copy_gbps}}}
    return bench, medians, copy_gbps, nbytes


def test_report_renders_rows_targets_and_chart(tmp_path, capsys):
    bench, medians, copy_gbps, nbytes = _fake_bench(random.Random())
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    md, png = tmp_path / "out.md", tmp_path / "out.png"
    assert report.main([str(path), "--out-md", str(md), "--out-png", str(png)]) == 0
    text = md.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    for (case, provider), median in medians.items():
        pattern = rf"\| {case} \| \**{re.escape(provider)}\** \|"
        row = next(line for line in text.splitlines() if re.match(pattern, line))
        assert f"| {median * 1e3:.3f} | {nbytes[case] / median / 1e9:.1f} |" in row
    ratio = medians[("ema-gpt2-fp32", "torch:foreach")] / medians[("ema-gpt2-fp32", "swm:cpp")]
    fraction = nbytes["ema-gpt2-fp32"] / medians[("ema-gpt2-fp32", "swm:cpp")] / 1e9 / copy_gbps
    target = next(line for line in text.splitlines() if line.startswith("| fp32 EMA, GPT-2-like list |"))
    assert f"{ratio:.2f}x, {100 * fraction:.0f}% of copy BW" in target
    assert target.rstrip(" |").endswith("yes" if ratio >= 1.0 and fraction >= 0.85 else "NO")
    merge_ratio = medians[("merge8-gpt2-fp32", "torch:loop")] / medians[("merge8-gpt2-fp32", "swm:cpp")]
    merge_target = next(line for line in text.splitlines() if line.startswith("| K=8 fp32 merge"))
    assert merge_target.rstrip(" |").endswith("yes" if merge_ratio >= 1.7 else "NO")
    assert "not measured" in next(line for line in text.splitlines() if line.startswith("| 20,000 small"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_a_json_without_our_results(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmarks": [{"extra_info": {}}], "machine_info": {}, "datetime": ""}))
    assert report.main([str(path)]) == 1


def test_gpu_dry_run_covers_every_provider(tmp_path):
    wanted = ["ema-gpt2-fp32", "merge2-gpt2-bf16"]
    out = tmp_path / "gpu.md"
    assert gpu.main(["--device", "cpu", "--quick", "--budget", "0.001", "-k", *wanted, "--out", str(out)]) == 0
    results, _, not_run_section = out.read_text().partition("## Not run")
    measured = set(re.findall(r"^\| ([\w.-]+) \| \**([\w:]+)\** \| [\d.]+ \|", results, flags=re.M))
    not_run = {(c, p) for p, cases in re.findall(r"^\| ([\w:]+) \| .+ \| ([\w., -]+) \|$", not_run_section, flags=re.M)
               if p != "provider" for c in cases.split(", ")}
    expected = {(c.name, p.name) for c, p in pairs([c for c in cpu_cases() if c.name in wanted], providers("cpu"))}
    assert measured | not_run == expected
    assert not measured & not_run
    assert ("ema-gpt2-fp32", "torch:foreach") in measured and ("merge2-gpt2-bf16", "torch:loop") in measured


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_gpu_without_cuda_exits_with_a_message(capsys):
    assert gpu.main([]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_report_renders_the_interleaved_merge_rounds(tmp_path, capsys):
    """test_merge_interleaved's results alone (`-k interleaved`) still make a report: the K-way table."""
    summary = {"k": 8, "rounds": 9, "copy_gbps": 50.0, "torch_gbps": 25.0, "ours_gbps": 41.0,
               "ours_over_copy": 0.83, "torch_over_copy": 0.5, "ours_over_torch": 1.64}
    bench = {"datetime": "2026-01-01T00:00:00", "machine_info": {"cpu": {"brand_raw": "test CPU", "count": 2}},
             "benchmarks": [{"group": "merge8-gpt2-fp32-interleaved", "stats": {"median": 0.1},
                             "extra_info": {"interleaved": summary}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert report.main([str(path)]) == 0
    assert "| 8 | 9 | 50.0 | 25.0 | 41.0 | 83% | 1.64x |" in capsys.readouterr().out
