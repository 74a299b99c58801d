"""Backend selection: forced backends, automatic fallback, and `python -m swm_fused info`."""
import os
import subprocess
import sys

import pytest
import torch

import swm_fused
from swm_fused import dispatch
from _helpers import random_tensor

CPU = torch.device("cpu")


def test_reference_is_always_available():
    assert "reference" in swm_fused.available_backends()


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI must build the C++ extension; locally it may be absent")
def test_ci_builds_the_cpp_backend():
    assert "cpp" in swm_fused.available_backends(), dispatch.backend_status()["cpp"]


def test_automatic_choice_on_cpu_is_cpp_when_built_else_reference():
    expected = "cpp" if "cpp" in swm_fused.available_backends() else "reference"
    assert dispatch.select(CPU).NAME == expected


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with swm_fused.use_backend("fast"):
            pass


def test_forced_missing_backend_raises_with_its_reason_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(dispatch._probe_cache, "cpp", (None, "extension not built: ImportError: no _C"))
    with pytest.raises(RuntimeError, match="cpp: extension not built: ImportError: no _C"):
        with swm_fused.use_backend("cpp"):
            pass
    monkeypatch.setenv("SWM_FUSED_BACKEND", "cpp")
    avg, src = [random_tensor((5,), torch.float32)], [random_tensor((5,), torch.float32)]
    before = avg[0].clone()
    with pytest.raises(RuntimeError, match="cpp: extension not built"):
        swm_fused.ema_(avg, src, 0.5)
    assert torch.equal(avg[0], before)
    monkeypatch.delenv("SWM_FUSED_BACKEND")
    swm_fused.ema_(avg, src, 0.5)  # automatic choice falls back quietly
    assert dispatch.select(CPU).NAME == "reference"
    assert "cpp" not in swm_fused.available_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_forcing_cuda_without_a_gpu_says_why():
    with pytest.raises(RuntimeError, match="^cuda: "):
        with swm_fused.use_backend("cuda"):
            swm_fused.ema_(torch.zeros(2), torch.ones(2), 0.5)


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("SWM_FUSED_BACKEND", raising=False)
    assert dispatch.forced_backend() is None
    with swm_fused.use_backend("reference"):
        assert dispatch.forced_backend() == "reference"
        with swm_fused.use_backend(None):
            assert dispatch.forced_backend() is None
        assert dispatch.forced_backend() == "reference"
    assert dispatch.forced_backend() is None


def test_env_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("SWM_FUSED_BACKEND", "reference")
    assert dispatch.select(CPU).NAME == "reference"


def test_info_lists_backends_and_passes_its_self_check():
    proc = subprocess.run([sys.executable, "-m", "swm_fused", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in swm_fused.available_backends():
        assert f"{name:<10} available" in proc.stdout
    for name, reason in dispatch.backend_status().items():
        if reason:
            assert f"{name:<10} unavailable: " in proc.stdout
    assert "MISMATCH" not in proc.stdout
