"""pytest setup for the CPU benchmarks: options, the copy-bandwidth ceiling, and machine info.

Run: ``pytest bench/ --benchmark-only`` (add ``--benchmark-json FILE`` to keep the
results for ``bench/report.py``; ``--bench-quick`` for a smoke run on tiny workloads).
"""
from __future__ import annotations

import pathlib
import sys
from typing import Dict

import pytest
import torch

try:
    import swm_fused
except ImportError:  # not installed: benchmark this checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import swm_fused

from cases import copy_ceiling, time_calls

_session: Dict[str, object] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("swm_fused benchmarks")
    group.addoption("--bench-quick", action="store_true",
                    help="cut every workload to a few of its real tensors: a fast smoke run; its numbers mean nothing")
    group.addoption("--bench-budget", type=float, default=1.0,
                    help="seconds of timed calls per benchmark: rounds = budget / time per call, "
                         "between 3 and 30 (default 1.0)")


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """The CPU ceiling in GB/s, measured once in this run: an in-place add_ of two 64M-element fp32 tensors."""
    call, nbytes, description = copy_ceiling(torch.device("cpu"))
    seconds = time_calls([call], torch.device("cpu"), budget_s=1.0, min_reps=5, max_reps=20)
    del call  # frees the two 256 MB tensors
    _session["copy_ceiling"] = {"description": description, "bytes": nbytes, "median_s": seconds,
                                "gbps": nbytes / seconds / 1e9}
    return nbytes / seconds / 1e9


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["swm_fused"] = swm_fused.__version__
    machine_info["swm_fused_backends"] = swm_fused.available_backends()
    machine_info["bench_quick"] = bool(config.getoption("--bench-quick"))
    if "copy_ceiling" in _session:
        machine_info["copy_ceiling"] = _session["copy_ceiling"]
