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


def test_the_extension_is_built_so_reference_and_cpp_are_available():
    """The extension holds the one validator every backend runs, so the package needs it."""
    assert {"reference", "cpp"} <= set(swm_fused.available_backends()), dispatch.backend_status()


def test_automatic_choice_is_fixed_per_device_type():
    assert dispatch.select(CPU).name == "cpp"
    assert dispatch.select(torch.device("meta")).name == "reference"
    if torch.cuda.is_available() and not dispatch.backend_status()["cuda"]:
        assert dispatch.select(torch.device("cuda")).name == "cuda"


def test_selection_never_times_or_synchronises(monkeypatch):
    """The old automatic choice timed cuda against triton inside the first CUDA op; now only tune() does."""
    def forbidden(*args, **kwargs):
        raise AssertionError("selection synchronised or timed")
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda, "Event", forbidden)
    for device in [CPU, torch.device("meta")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
        dispatch.select(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_without_a_gpu_says_why():
    with pytest.raises(RuntimeError, match="tune: no CUDA device"):
        swm_fused.tune()


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
    assert dispatch.select(CPU).name == "reference"
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
    assert dispatch.select(CPU).name == "reference"


def test_info_lists_backends_and_passes_its_self_check():
    proc = subprocess.run([sys.executable, "-m", "swm_fused", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in swm_fused.available_backends():
        assert f"{name:<10} available" in proc.stdout
    for name, reason in dispatch.backend_status().items():
        if reason:
            assert f"{name:<10} unavailable: " in proc.stdout
    assert "MISMATCH" not in proc.stdout
