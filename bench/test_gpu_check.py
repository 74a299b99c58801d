"""bench/gpu_check.sh must not rot between GPU days: its --dry-run runs every phase on this CPU machine.

Run: ``pytest bench/test_gpu_check.py -q`` (about a minute: it runs a few tests, the sanitizer script on CPU and
gpu.py's quick dry run).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent
SCRIPT = BENCH / "gpu_check.sh"
PHASES = ("versions", "build", "tests", "sanitizer", "bench")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run"], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    out = tmp_path / "out"
    summaries, logs, tables = (list(out.glob(pattern)) for pattern in ("gpu_check-*.md", "gpu_check-*.log", "gpu-*.md"))
    assert len(summaries) == 1 and len(logs) == 1 and len(tables) == 1, sorted(p.name for p in out.iterdir())
    summary = summaries[0].read_text()
    assert "**PASS**" in summary, summary
    for phase in PHASES:
        row = re.search(rf"^\| {phase} \| (\S[^|]*?) \|", summary, re.M)
        assert row, f"phase {phase} missing from the summary:\n{summary}"
        assert row.group(1) in ("ok", "skipped"), f"phase {phase}: {row.group(1)}\n{summary}"
    for item in ("torch", "triton", "GPU", "nvcc"):
        assert re.search(rf"^\| {item}\b", summary, re.M), f"no {item} version in the summary:\n{summary}"
    assert re.search(r"\d+ passed, 0 failed, 0 errors", summary), summary
    assert "## Figures the tests measured\n\n(none recorded)" in summary, summary  # the dry run's tests record none
    assert "measured in this run" in tables[0].read_text()
    assert "===== bench" in logs[0].read_text()


def test_gpu_check_rejects_a_missing_out_dir():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_sanitize_ops_names_every_public_op():
    """The sanitizer pass only checks what sanitize_ops.py calls: every public op, merges with K = 1, 3, 8, 11."""
    text = (BENCH / "sanitize_ops.py").read_text()
    for op in ("ema_", "swa_", "swag_", "merge_", "any_nonfinite"):
        assert f"swm_fused.{op}(" in text, op
    assert re.search(r"MERGE_KS = \(1, 3, 8, 11\)", text)


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="{tests}">
<testcase classname="tests.test_cuda_graph" name="test_update[lists]">
<properties><property name="gpu_figure" value="{figure}"/><property name="other" value="x"/></properties>
</testcase>
<testcase classname="tests.test_ops" name="test_a"/>
</testsuite></testsuites>"""


def test_junit_summary_reads_counts_and_recorded_figures(tmp_path):
    """gpu_check.sh's summary: counts and the figures tests record (fresh values each run, so a stale parse fails)."""
    import random

    tests, figure = random.randint(10, 1000), f"{random.uniform(1, 9):.3f} ms GPU"
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT.format(tests=tests, figure=figure))
    run = [sys.executable, str(BENCH / "junit_summary.py"), str(report)]
    counts = subprocess.run(run + ["counts"], capture_output=True, text=True, check=True).stdout
    assert counts.strip() == f"{tests - 6} passed, 2 failed, 1 errors, 3 skipped"
    figures = subprocess.run(run + ["figures"], capture_output=True, text=True, check=True).stdout
    assert figures == f"- tests.test_cuda_graph::test_update[lists]: {figure}\n"
    bad = subprocess.run(run[:-1] + [str(tmp_path / "missing.xml"), "counts"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read" in bad.stderr
