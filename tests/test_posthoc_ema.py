"""PostHocEMA (tracking power-function EMA profiles, snapshots, resume) and reconstruction from snapshots
(swm_fused.posthoc.reconstruct, `swm-fused phema`): docs/posthoc.md."""
from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import swm_fused
from swm_fused import cli, engine as engine_module, posthoc
from swm_fused.engine import AveragingEngine
from swm_fused.merge.readers import load_state_dict
from swm_fused.posthoc import PostHocEMA, power_function_beta, read_snapshots, reconstruct, sigma_rel_to_gamma

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def small_model(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


@torch.no_grad()
def wiggle(model: nn.Module, scale: float = 0.1) -> None:
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)


def snapshots_of(tmp_path: Path, model: nn.Module, steps=(5, 10, 15, 20), sigma_rels=(0.05, 0.10), **kwargs) -> Path:
    folder = tmp_path / "snaps"
    phema = PostHocEMA(model, sigma_rels=sigma_rels, snapshot_dir=folder, snapshot_dtype=torch.float32, **kwargs)
    for step in range(1, max(steps) + 1):
        wiggle(model)
        phema.update()
        if step in steps:
            phema.snapshot()
    return folder


# ---------------------------------------------------------------------------------- the engine
def test_engine_ema_multi_matches_separate_updates_and_skips_nonfinite():
    model = small_model()
    dtypes = (torch.float32, torch.float64, torch.bfloat16)  # one layout, three dtypes
    fused = [AveragingEngine(model, dtype=d) for d in dtypes]
    alone = [AveragingEngine(model, dtype=d) for d in dtypes]
    assert all(fused[0].shares_layout(e) for e in fused + alone)
    assert not fused[0].shares_layout(AveragingEngine(small_model()))  # another model object
    for _ in range(4):
        wiggle(model)
        weights = [int(k) / 1024 for k in torch.randint(1, 1024, (3,))]  # 1 - (1 - w) == w exactly
        AveragingEngine.ema_multi(fused, weights)
        for e, w in zip(alone, weights):
            e.update("ema", decay=1.0 - w)
    for a, b in zip(fused, alone):
        for x, y in zip(a.views(), b.views()):
            assert torch.equal(x, y)
        assert a.attempts == b.attempts == [4] and int(a.count(0)) == 4
    before = [[v.clone() for v in e.views()] for e in fused]
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    AveragingEngine.ema_multi(fused, [0.5, 0.5, 0.5])
    for e, old in zip(fused, before):
        assert all(torch.equal(v, o) for v, o in zip(e.views(), old))
        assert int(e.skipped) == 1 and int(e.count(0)) == 4 and e.attempts == [5]


def test_engine_ema_multi_keeps_the_latest_integer_buffers_unless_skipped():
    """Engines with buffers: the floating ones averaged, integer ones (num_batches_tracked) copied unless
    the step is skipped, as update("ema") does engine by engine."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    fused = [AveragingEngine(model, include_buffers=True) for _ in range(2)]
    alone = [AveragingEngine(model, include_buffers=True) for _ in range(2)]
    for step in range(4):
        model.train()
        model(torch.randn(5, 4))  # moves the running stats and counts a batch
        wiggle(model)
        if step == 2:
            with torch.no_grad():
                model[0].bias[0] = float("nan")
        AveragingEngine.ema_multi(fused, [0.5, 0.25])
        for e, w in zip(alone, [0.5, 0.25]):
            e.update("ema", decay=1.0 - w)
        if step == 2:  # skipped: the count of step 1 stays, though the model has counted 3 batches
            assert [int(e.average_state_dict()["1.num_batches_tracked"]) for e in fused + alone] == [2] * 4
            with torch.no_grad():
                model[0].bias[0] = 0.0
    for a, b in zip(fused, alone):
        got, expected = a.average_state_dict(), b.average_state_dict()
        assert got.keys() == expected.keys() and "1.num_batches_tracked" in got
        for name in got:
            assert torch.equal(got[name], expected[name]), name
        assert int(got["1.num_batches_tracked"]) == 4  # the latest again
        assert int(a.skipped) == int(b.skipped) == 1 and int(a.count(0)) == int(b.count(0)) == 3


def test_lazy_export():
    assert swm_fused.PostHocEMA is PostHocEMA and swm_fused.posthoc is posthoc


def test_update_is_one_call_into_cpp_on_lists_bound_once(monkeypatch):
    """One BoundLists.step_multi_ per update (check, K averages, counters), on one binding; no plain op
    runs on the compiled backend (they would raise here)."""
    from swm_fused import ops

    calls = []
    real = swm_fused.BoundLists.step_multi_

    def spy(self, weights, *args, **kwargs):
        calls.append((id(self), len(weights)))
        return real(self, weights, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a plain op ran inside PostHocEMA.update")

    monkeypatch.setattr(swm_fused.BoundLists, "step_multi_", spy)
    for module in (engine_module, ops):
        for name in ("ema_multi_", "ema_", "any_nonfinite"):
            monkeypatch.setattr(module, name, forbidden)
    model = small_model()
    phema = PostHocEMA(model, sigma_rels=(0.05, 0.08, 0.10))
    for _ in range(3):
        wiggle(model)
        phema.update()
    assert [k for _, k in calls] == [3, 3, 3] and len({i for i, _ in calls}) == 1
    assert phema.engines[0].attempts == [3] and all(int(e.count(0)) == 3 for e in phema.engines)


# ------------------------------------------------------------------------------------- profiles
def test_update_every_10_steps_equals_10_single_steps():
    """Iterate b (a one-hot vector) is the model for steps 10(b-1)+1..10b, so each average *is* its
    profile's weights per block: both spacings give the closed form, and a decay ignoring dt would not."""
    blocks = 8
    sigma_rels = (0.05, 0.10)
    every_step, every_10 = {"w": torch.zeros(blocks)}, {"w": torch.zeros(blocks)}
    a, b = PostHocEMA(every_step, sigma_rels), PostHocEMA(every_10, sigma_rels)
    for step in range(1, 10 * blocks + 1):
        block = (step - 1) // 10
        every_step["w"].zero_()[block] = 1.0
        a.update()
        if step % 10 == 0:
            every_10["w"].zero_()[block] = 1.0
            b.update(step=step)
    n = 10 * blocks
    for s in sigma_rels:
        g = sigma_rel_to_gamma(s)
        exact = torch.tensor([((10 * (k + 1) / n) ** (g + 1) - (10 * k / n) ** (g + 1)) for k in range(blocks)],
                             dtype=torch.float32)
        got_a, got_b = a.profile_state_dict(s)["w"], b.profile_state_dict(s)["w"]
        torch.testing.assert_close(got_a, exact, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_b, exact, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_a, got_b, rtol=0, atol=1e-5)
        # the same 8 updates with a decay that ignores dt (beta of a one-step gap): far off
        naive = torch.zeros(blocks, dtype=torch.float64)
        for k in range(blocks):
            beta = power_function_beta(10 * (k + 1), 1, g) if k else 0.0
            naive *= beta
            naive[k] = 1 - beta
        assert (naive.float() - exact).abs().max() > 0.05


def test_bf16_model_fp32_profiles_and_time_in_samples():
    model = small_model(torch.bfloat16)
    phema = PostHocEMA(model, sigma_rels=(0.1,), time="samples")
    assert phema.engines[0].flat_average().storages[0].dtype == torch.float32
    oracle = None
    seen = 0
    for batch in (32, 32, 17, 64):
        wiggle(model)
        seen += batch
        theta = {n: p.detach().double() for n, p in model.named_parameters()}
        beta = power_function_beta(seen, batch if oracle is not None else seen, sigma_rel_to_gamma(0.1))
        oracle = theta if oracle is None else {n: beta * oracle[n] + (1 - beta) * theta[n] for n in theta}
        phema.update(samples=seen)
    for name, value in phema.profile_state_dict(0.1).items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), oracle[name], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs samples="):
        phema.update()
    with pytest.raises(ValueError, match="time must increase"):
        phema.update(samples=seen)


def test_nonfinite_update_is_skipped_and_time_still_advances():
    model = small_model()
    phema = PostHocEMA(model, sigma_rels=(0.05, 0.1))
    for _ in range(3):
        wiggle(model)
        phema.update()
    before = {s: {n: t.clone() for n, t in phema.profile_state_dict(s).items()} for s in phema.sigma_rels}
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    phema.update()  # t = 4, skipped on the device
    assert phema.t == 4 and int(phema.skipped) == 1
    for s in phema.sigma_rels:
        assert all(torch.equal(t, before[s][n]) for n, t in phema.profile_state_dict(s).items())
    wiggle(model)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.5
    phema.update()  # t = 5: dt = 1 from the skipped call (documented)
    for s in phema.sigma_rels:
        beta = power_function_beta(5, 1, sigma_rel_to_gamma(s))
        for n, p in model.named_parameters():
            expected = beta * before[s][n].double() + (1 - beta) * p.detach().double()
            torch.testing.assert_close(phema.profile_state_dict(s)[n].double(), expected, rtol=1e-6, atol=1e-7)


def test_resume_continues_bit_for_bit(tmp_path):
    model = small_model()
    init = {n: t.clone() for n, t in model.state_dict().items()}
    steps = [1, 2, 5, 6, 7, 11, 12, 20, 21, 22, 30, 31, 33]
    trajectory = [[torch.randn_like(p) for p in model.parameters()] for _ in steps]

    def run(phema, model, indices):
        for i in indices:
            with torch.no_grad():
                for p, d in zip(model.parameters(), trajectory[i]):
                    p.add_(d * 0.1)
            phema.update(step=steps[i])

    kwargs = dict(sigma_rels=(0.05, 0.07, 0.12), snapshot_every=10)
    whole = PostHocEMA(model, snapshot_dir=tmp_path / "whole", **kwargs)
    run(whole, model, range(len(steps)))

    model_a = small_model()
    model_a.load_state_dict(init)
    first = PostHocEMA(model_a, snapshot_dir=tmp_path / "resumed", **kwargs)
    run(first, model_a, range(7))
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "phema": first.state_dict()}, buffer)
    del first, model_a
    buffer.seek(0)
    saved = torch.load(buffer)
    model_b = small_model()
    model_b.load_state_dict(saved["model"])
    resumed = PostHocEMA(model_b, snapshot_dir=tmp_path / "resumed", **kwargs)
    resumed.load_state_dict(saved["phema"])
    run(resumed, model_b, range(7, len(steps)))

    for s in kwargs["sigma_rels"]:
        for n, t in whole.profile_state_dict(s).items():
            assert torch.equal(t, resumed.profile_state_dict(s)[n]), (s, n)  # 0 ulps
    assert resumed.t == whole.t == 33 and resumed.engines[0].attempts == whole.engines[0].attempts
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir()) and len(names) == 3 * 3
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()

    other = PostHocEMA(small_model(), sigma_rels=(0.05, 0.07))
    with pytest.raises(ValueError, match="sigma_rels"):
        other.load_state_dict(saved["phema"])


# ------------------------------------------------------------------------------ device / offload
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_device_cpu_profiles_equal_the_default_ones_bit_for_bit(tmp_path, device):
    model = small_model(torch.bfloat16)
    default = PostHocEMA(model, (0.05, 0.1), snapshot_every=3, snapshot_dir=tmp_path / "default")
    placed = PostHocEMA(model, (0.05, 0.1), snapshot_every=3, snapshot_dir=tmp_path / "placed", device=device)
    for e in placed.engines:
        assert e.device == torch.device("cpu") and e.devices == [torch.device("cpu")]
        assert all(s.device.type == "cpu" for s in e.flat_average().storages)
    for step in range(1, 8):
        wiggle(model)
        if step == 5:
            with torch.no_grad():
                model[0].bias[0] = float("nan")  # skipped by both
        default.update()
        placed.update()
        if step == 5:
            with torch.no_grad():
                model[0].bias[0] = 0.25
    assert int(default.skipped) == int(placed.skipped) == 1
    for s in placed.sigma_rels:
        for name, value in placed.profile_state_dict(s).items():
            assert torch.equal(value, default.profile_state_dict(s)[name]), (s, name)
    names = sorted(p.name for p in (tmp_path / "default").iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "placed").iterdir())
    for name in names:
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "placed" / name).read_bytes()


def test_device_keeps_profiles_on_another_device_than_the_model(monkeypatch):
    """The offload path (averages on one device, the model on another, a staging copy each update):
    the meta device stands in for the second device on a CPU-only machine, so this checks placement
    and plumbing, not values (test_cpu_offload_of_a_cuda_model_matches_profiles_on_the_gpu does those)."""
    sources = []
    real = swm_fused.BoundLists.step_multi_

    def spy(self, *args, **kwargs):
        sources.append(self._lists[-1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(swm_fused.BoundLists, "step_multi_", spy)
    model = small_model()
    phema = PostHocEMA(model, (0.05, 0.1), device="meta")
    for e in phema.engines:
        assert e.devices == [torch.device("meta")]
        assert all(s.device.type == "meta" for s in e.flat_average().storages)
        assert [s.device.type for b in e.staging_buffers() for s in b.storages] == ["meta"]
    for _ in range(2):
        wiggle(model)
        phema.update()
    assert len(sources) == 2 and all(t.device.type == "meta" for src in sources for t in src)
    assert phema.engines[0].attempts == [2] and phema.skipped.device.type == "meta"
    with pytest.raises(RuntimeError):
        PostHocEMA(model, device="no-such-device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_of_a_cuda_model_matches_profiles_on_the_gpu(tmp_path):
    model = small_model(torch.bfloat16).cuda()
    on_gpu = PostHocEMA(model, (0.05, 0.1), snapshot_dir=tmp_path / "gpu", snapshot_dtype=torch.float32)
    offloaded = PostHocEMA(model, (0.05, 0.1), device="cpu", snapshot_dir=tmp_path / "cpu",
                           snapshot_dtype=torch.float32)
    assert on_gpu.engines[0].devices[0].type == "cuda" and offloaded.engines[0].devices == [torch.device("cpu")]
    assert all(s.is_pinned() for b in offloaded.engines[0].staging_buffers() for s in b.storages)
    oracle = {s: None for s in on_gpu.sigma_rels}
    for step in range(1, 9):
        wiggle(model)
        if step == 4:
            with torch.no_grad():
                model[2].weight[0, 0] = float("inf")  # skipped by both, on their own devices
        on_gpu.update()
        offloaded.update()
        if step == 4:
            with torch.no_grad():
                model[2].weight[0, 0] = 0.5
            continue
        theta = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
        for s, g in zip(on_gpu.sigma_rels, on_gpu.gammas):
            beta = power_function_beta(step, 1, g)  # dt = 1 after the skipped call too (time advanced)
            oracle[s] = theta if oracle[s] is None else {n: beta * oracle[s][n] + (1 - beta) * theta[n] for n in theta}
    assert int(on_gpu.skipped) == int(offloaded.skipped) == 1
    on_gpu.snapshot()
    offloaded.snapshot()
    for s in on_gpu.sigma_rels:
        for name, value in offloaded.profile_state_dict(s).items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(value, on_gpu.profile_state_dict(s)[name].cpu(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(value.double(), oracle[s][name], rtol=1e-5, atol=1e-6)
        got = load_state_dict(offloaded.snapshot_path(s))
        expected = load_state_dict(on_gpu.snapshot_path(s))
        for name in got:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ snapshots
def test_snapshot_files_and_metadata(tmp_path):
    model = small_model(torch.bfloat16)
    folder = tmp_path / "s"
    phema = PostHocEMA(model, sigma_rels=(0.05, 0.1), snapshot_every=4, snapshot_dir=folder)
    for _ in range(9):
        wiggle(model)
        phema.update()
    snaps = read_snapshots(folder)
    assert sorted((s.t, s.sigma_rel) for s in snaps) == [(4, 0.05), (4, 0.1), (8, 0.05), (8, 0.1)]
    assert {s.time for s in snaps} == {"steps"} and {s.fingerprint for s in snaps} == {phema.fingerprint}
    from safetensors import safe_open
    with safe_open(str(phema.snapshot_path(0.1, 8)), "pt") as f:
        meta = f.metadata()
        assert float(meta["swm_fused.phema.gamma"]) == pytest.approx(sigma_rel_to_gamma(0.1))
        assert meta["swm_fused.phema.t"] == "8" and meta["swm_fused.phema.step"] == "8"
        assert f.get_tensor("0.weight").dtype == torch.float16


def test_exception_between_write_and_rename_leaves_nothing(tmp_path, monkeypatch):
    model = small_model()
    folder = tmp_path / "s"
    phema = PostHocEMA(model, snapshot_dir=folder)
    wiggle(model)
    phema.update()

    def refuse(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="simulated"):
        phema.snapshot()
    assert list(folder.iterdir()) == []


def test_killed_writer_leaves_no_file_reconstruction_reads(tmp_path):
    folder = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from swm_fused.merge import writer
        from swm_fused.posthoc import PostHocEMA
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        phema = PostHocEMA(model, snapshot_dir={str(folder)!r})
        for _ in range(5):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            phema.update()
        phema.snapshot()                          # t = 5: complete
        phema.update()
        written = []
        original = writer._write_tensor
        def write_then_die(file, tensor):
            original(file, tensor)
            written.append(1)
            if len(written) == 2:
                file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        writer._write_tensor = write_then_die
        phema.snapshot()                          # t = 6: killed inside the first file
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in folder.iterdir())
    leftovers = [n for n in names if n.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the temporary file, never read
    assert sorted(n for n in names if not n.startswith(".")) == [
        "phema-t000000000005-sigma0.05.safetensors", "phema-t000000000005-sigma0.1.safetensors"]
    assert {s.t for s in read_snapshots(folder)} == {5}
    assert set(reconstruct(folder, 0.07)) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    with pytest.raises(ValueError, match="no snapshot was taken at the target time 6"):
        reconstruct(folder, 0.07, at=6)


# ------------------------------------------------------------------------------- reconstruction
def test_reconstruct_is_the_weighted_sum(tmp_path):
    model = small_model()
    folder = snapshots_of(tmp_path, model)
    snaps = read_snapshots(folder)
    x = posthoc.solve_coefficients([(s.t, s.sigma_rel) for s in snaps], (20, 0.08))
    got = reconstruct(folder, 0.08)
    for name, value in got.items():
        expected = sum(float(w) * load_state_dict(s.path)[name].double() for w, s in zip(x, snaps))
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    at_10 = reconstruct(folder, 0.08, at=10)
    assert not torch.equal(at_10["0.weight"], got["0.weight"])


def test_bad_inputs_are_refused(tmp_path):
    model = small_model()
    folder = snapshots_of(tmp_path, model, steps=(5, 10))
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        reconstruct(folder, 0.3)
    with pytest.raises(ValueError, match="no snapshot was taken at the target time 7"):
        reconstruct(folder, 0.08, at=7)
    with pytest.raises(ValueError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path, 0.08)
    single = tmp_path / "single"
    single.mkdir()
    one = next(folder.glob("phema-t000000000005-sigma0.05*"))
    os.link(one, single / one.name)
    with pytest.raises(ValueError, match="at least two distinct snapshot profiles"):
        reconstruct(single, 0.05)
    other = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    PostHocEMA(other, snapshot_dir=folder).update()  # same names, other shapes, into the same folder
    phema = PostHocEMA(other, snapshot_dir=folder)
    phema.update()
    phema.snapshot()
    with pytest.raises(ValueError, match="different models"):
        reconstruct(folder, 0.08)
    with pytest.raises(ValueError, match="repeat"):
        PostHocEMA(model, sigma_rels=(0.1, 0.1))
    with pytest.raises(ValueError, match="snapshot_dir"):
        PostHocEMA(model, snapshot_every=10)


def test_cli_bad_inputs_write_nothing(tmp_path, capsys):
    folder = snapshots_of(tmp_path, small_model(), steps=(5, 10))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["phema", str(folder), "--sigma-rel", "0.05", "0.4", "-o", str(out)])
    assert exc.value.code == 2 and "--sigma-rel: sigma_rel must be in" in capsys.readouterr().err
    assert cli.main(["phema", str(folder), "--sigma-rel", "0.05", "-o", str(out), "--at", "7"]) == 1
    assert "no snapshot was taken at the target time 7" in capsys.readouterr().err
    single = tmp_path / "single"
    single.mkdir()
    one = next(folder.glob("phema-t000000000005-*"))
    os.link(one, single / one.name)
    assert cli.main(["phema", str(single), "--sigma-rel", "0.05", "-o", str(out)]) == 1
    assert "at least two distinct" in capsys.readouterr().err
    assert not out.exists()


def test_cli_subprocess(tmp_path):
    model = small_model()
    folder = snapshots_of(tmp_path, model)
    out = tmp_path / "out"
    base = [sys.executable, "-m", "swm_fused", "phema", str(folder)]
    procs = [subprocess.Popen(base + ["--sigma-rel", "0.06", "0.09", "-o", str(out), "--dtype", "fp32",
                                      "--progress"], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True),
             subprocess.Popen(base + ["--sigma-rel", "0.5", "-o", str(tmp_path / "bad")], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    (ok_out, ok_err), (bad_out, bad_err) = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 0, ok_err
    assert "post-hoc EMA" in ok_err  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["ema-sigma0.06-t20.safetensors", "ema-sigma0.09-t20.safetensors"]
    for s in (0.06, 0.09):
        got = load_state_dict(out / f"ema-sigma{s}-t20.safetensors")
        for name, value in reconstruct(folder, s).items():
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)
    assert procs[1].returncode == 2 and "usage:" in bad_err and "sigma_rel must be in" in bad_err
    assert not (tmp_path / "bad").exists()


def test_cli_outputs_record_the_post_hoc_facts(tmp_path, capsys):
    """The metadata names the target, its gamma and time, the snapshots used and their coefficients, and
    those coefficients applied to those snapshots give the file's tensors."""
    import json

    from safetensors import safe_open

    model = small_model()
    folder = tmp_path / "snaps"
    phema = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_dir=folder, snapshot_dtype=torch.float32,
                       time="samples")
    seen = 0
    for step in range(1, 13):
        wiggle(model)
        seen += int(torch.randint(1, 64, ()))
        phema.update(samples=seen)
        if step % 4 == 0:
            phema.snapshot()
    snaps = read_snapshots(folder)
    target = sorted({s.t for s in snaps})[1]  # the second of three snapshot times: the third is left out
    x = posthoc.solve_coefficients([(s.t, s.sigma_rel) for s in snaps], (target, 0.07))
    out = tmp_path / "out"
    assert cli.main(["phema", str(folder), "--sigma-rel", "0.07", "-o", str(out), "--at", str(target)]) == 0
    capsys.readouterr()
    path = out / f"ema-sigma0.07-t{target}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    key = "swm_fused.phema."
    assert meta[key + "kind"] == "reconstruction" and meta[key + "time"] == "samples"
    assert float(meta[key + "sigma_rel"]) == 0.07 and int(meta[key + "t"]) == target
    assert float(meta[key + "gamma"]) == pytest.approx(sigma_rel_to_gamma(0.07), rel=1e-12)
    assert meta[key + "fingerprint"] == phema.fingerprint
    names, coefficients = json.loads(meta[key + "snapshots"]), json.loads(meta[key + "coefficients"])
    used = [i for i in range(len(snaps)) if x[i] != 0]
    assert names == [snaps[i].path.name for i in used] and len(names) == 4  # t = 4 and 8, two profiles each
    assert coefficients == pytest.approx([x[i] for i in used], rel=1e-12, abs=1e-15)
    assert math.fsum(coefficients) == pytest.approx(1.0, abs=1e-12)
    assert meta["swm_fused.method"] == "linear"  # merge_files' own keys stay
    got = load_state_dict(path)
    for name, value in got.items():
        expected = sum(c * load_state_dict(folder / n)[name].double() for n, c in zip(names, coefficients))
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_merge_files_metadata_is_checked_before_writing(tmp_path):
    from swm_fused.merge import merge_files

    folder = snapshots_of(tmp_path, small_model(), steps=(5, 10))
    inputs = sorted(folder.glob("phema-*.safetensors"))[:2]
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match="are the merge's own keys"):
        merge_files(inputs, out, metadata={"swm_fused.method": "mine"})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        merge_files(inputs, out, metadata={"note": 3})
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    merge_files(inputs, out, metadata={"note": "kept"})
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["note"] == "kept" and f.metadata()["swm_fused.method"] == "linear"


def test_reconstruction_on_a_real_trajectory(tmp_path, fresh_seed):
    """Train the demo's MLP on digits, tracking sigma_rel 0.05 and 0.10 with snapshots every 10 steps and
    0.075 directly. 0.075 rebuilt from the snapshots lies a small fraction of the 0.05-0.10 distance away
    from the tracked one, and closer the denser the snapshots used."""
    from swm_fused import demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = demo.load_digits_data(fresh_seed % 1000, torch.device("cpu"))
        model = demo.make_model(demo.Settings(width=64, dropout=0.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        folder = tmp_path / "all"
        stored = PostHocEMA(model, (0.05, 0.10), snapshot_every=10, snapshot_dir=folder,
                            snapshot_dtype=torch.float32)
        tracked = PostHocEMA(model, (0.075,))
        order = torch.Generator().manual_seed(fresh_seed)
        step, total = 0, 480
        while step < total:
            for xb, yb in demo.batches(data.x_train, data.y_train, 32, order):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                stored.update()
                tracked.update()
                step += 1
                if step == total:
                    break
    finally:
        torch.set_num_threads(threads)

    def distance(a, b):
        return math.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum().item() for n in a))

    target = tracked.profile_state_dict(0.075)
    span = distance(stored.profile_state_dict(0.05), stored.profile_state_dict(0.10))
    assert span > 0
    ratios = []
    for every in (160, 40, 10):
        sub = tmp_path / f"every{every}"
        sub.mkdir()
        for snap in read_snapshots(folder):
            if snap.t % every == 0:
                os.link(snap.path, sub / snap.path.name)
        ratios.append(distance(reconstruct(sub, 0.075), target) / span)
    assert ratios[0] > ratios[1] > ratios[2], ratios
    assert ratios[2] < 1e-3 and ratios[1] < 2e-2, ratios  # measured about 1e-5 and 2e-3
