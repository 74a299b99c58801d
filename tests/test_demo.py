"""`python -m swm_fused demo`: the command end to end (tiny settings), and its numbers against an oracle.

Two real processes (a tiny demo and a bad value) start together in a module fixture; each
spends most of its time importing torch, so the repeat runs go through cli.main in this
process. The oracle test records every weight snapshot the demo's averagers see and
recomputes each table row from them in float64 with torch's own update_bn.
"""
from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import torch
from torch.optim.swa_utils import update_bn

from swm_fused import averager, cli, demo

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
DEMO = [sys.executable, "-m", "swm_fused", "demo"]
TINY = ["--trajectories", "2", "--epochs", "3"]
ROW = re.compile(r"^\| (?P<name>[^|]+?) +\| +(?P<acc>\S+)% \| +(?P<nll>\S+) \| +(?P<cost>\S+) \|$")
ROW_PREFIXES = ("SGD (last iterate", "EMA", "SWA", "SAM + SWA", "SWM merge", "ensemble")


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(os.environ.get("SWM_FUSED_TEST_SEED", random.randrange(2**20)))
    print(f"demo seed={value} (replay with SWM_FUSED_TEST_SEED={value})")
    return value


@pytest.fixture(scope="module")
def runs(seed) -> Dict[str, Result]:
    """Real processes: a tiny demo, and one with a bad value (both start at once)."""
    commands = {"first": DEMO + TINY + ["--seed", str(seed)], "one_trajectory": DEMO + ["--trajectories", "1"]}
    procs = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                    cwd=REPO) for name, command in commands.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = Result(proc.returncode, stdout, stderr)
    return results


def run_in_process(capsys, argv: List[str]) -> Result:
    """The same command through cli.main, the entry point `python -m swm_fused` calls."""
    capsys.readouterr()
    code = cli.main(["demo"] + argv)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def table(stdout: str) -> List[demo.Row]:
    rows = [ROW.match(line) for line in stdout.splitlines()]
    return [demo.Row(m["name"], float(m["acc"]), float(m["nll"]), m["cost"]) for m in rows if m]


def results_part(stdout: str) -> str:
    """Everything that must repeat for one seed: all output before the timing lines."""
    return stdout[:stdout.index("EMA update, ")]


def test_demo_prints_every_row(runs):
    result = runs["first"]
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert [r.name[:len(p)] for r, p in zip(rows, ROW_PREFIXES)] == list(ROW_PREFIXES), result.stdout
    assert len(rows) == len(ROW_PREFIXES)
    for row in rows:
        assert 0.0 <= row.accuracy <= 100.0, row
        assert math.isfinite(row.nll) and row.nll >= 0.0, row
    assert [r.cost for r in rows] == ["1x"] * 5 + ["2x"]
    sam = re.search(r"SAM evaluates two gradients per step, so it took (\S+) gradient evaluations per trajectory "
                    r"against (\S+) for the SGD rows", result.stdout)
    assert sam and 0 < int(sam[1].replace(",", "")) <= int(sam[2].replace(",", "")), result.stdout
    barrier = re.search(r"interpolation barrier .*: (\S+) test NLL\n  test NLL along the line: (.*)", result.stdout)
    assert barrier, result.stdout
    assert float(barrier[1]) >= 0.0 and len(barrier[2].split()) == 11
    timing = re.search(r"WeightAverager.update (\S+) us, torch AveragedModel.update_parameters .* (\S+) us "
                       r"\((\S+)x\)", result.stdout)
    assert timing and all(float(v) > 0 for v in timing.groups()), result.stdout
    for label in ("EMA", "SWA", "SAM \\+ SWA", "The SWM merge"):
        assert re.search(rf"{label} (beat|did not beat) the SGD last iterate", result.stdout), result.stdout
    assert "training" in result.stderr  # the progress bar
    assert "Warning" not in result.stderr, result.stderr  # e.g. lr_scheduler.step() before optimizer.step()
    sections = re.search(r"time by section, wall \(CPU\): (.*)", result.stdout)
    assert sections and [s.split(" ")[0] for s in sections[1].split(", ")] == \
        ["data", "SGD", "SAM", "evaluation", "post-hoc"], result.stdout


def test_posthoc_line_reports_the_best_reconstruction(runs):
    result = runs["first"]
    assert result.returncode == 0, result.stderr
    line = re.search(r"post-hoc EMA \(trajectory 1\): .* (\d+) float16 snapshots .*test NLL by sigma_rel: (.*)\n"
                     r"  best on the test set: sigma_rel (\S+), (\S+)% accuracy, (\S+) NLL", result.stdout)
    assert line, result.stdout
    assert int(line[1]) == 2 * 3  # two profiles, one snapshot per epoch (TINY: 3 epochs)
    nll = {float(s): float(v) for s, v in (pair.split(": ") for pair in line[2].split(", "))}
    assert sorted(nll) == list(demo.POSTHOC_SIGMAS)
    assert all(math.isfinite(v) and v > 0 for v in nll.values())
    assert float(line[3]) == min(nll, key=nll.get) and float(line[5]) == min(nll.values())
    assert 0.0 <= float(line[4]) <= 100.0


def test_same_seed_repeats_and_another_seed_differs(runs, seed, capsys):
    """A second run with the seed (in this process, with its own thread settings) prints the same
    results; another seed (another split, init and data order) prints other numbers."""
    first = runs["first"]
    assert first.returncode == 0, first.stderr
    again = run_in_process(capsys, TINY + ["--seed", str(seed)])
    other = run_in_process(capsys, TINY + ["--seed", str(seed + 1)])
    assert again.returncode == 0 and other.returncode == 0, again.stderr + other.stderr
    assert results_part(again.stdout) == results_part(first.stdout)
    assert [(r.accuracy, r.nll) for r in table(other.stdout)] != [(r.accuracy, r.nll) for r in table(first.stdout)]


def test_bad_value_exits_1_with_one_line(runs):
    result = runs["one_trajectory"]
    assert result.returncode == 1
    assert result.stderr.strip() == "swm-fused demo: error: --trajectories must be at least 2, got 1"
    assert result.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "1"], "--epochs must be at least 2"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--swa-start", "1"], "--swa-start must be in (0, 1)"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--sam-rho", "-1"], "--sam-rho must be a finite number >= 0"),
    (["--device", "no-such-device"], "--device 'no-such-device' is not usable here"),
])
def test_bad_values_in_process(capsys, argv, message):
    assert cli.main(["demo"] + argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"swm-fused demo: error: {message}") and captured.err.count("\n") == 1, captured.err


@pytest.mark.parametrize("argv", [["--bogus"], ["--epochs", "2.5"], ["--trajectories"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo"] + argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


class SpyAverager(averager.WeightAverager):
    """A WeightAverager that also keeps, in float64, the model weights of every applied update."""

    instances: List["SpyAverager"] = []

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.model = model
        self.snapshots: List[Dict[str, torch.Tensor]] = []
        SpyAverager.instances.append(self)

    def update(self) -> bool:
        applied = super().update()
        if applied:
            self.snapshots.append({n: p.detach().double().clone() for n, p in self.model.named_parameters()})
        return applied


def oracle_ema(snapshots: List[Dict[str, torch.Tensor]], decay: float) -> Dict[str, torch.Tensor]:
    average = dict(snapshots[0])  # the first update copies
    for snap in snapshots[1:]:
        average = {n: decay * average[n] + (1 - decay) * snap[n] for n in average}
    return average


def oracle_mean(state_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {n: sum(sd[n] for sd in state_dicts) / len(state_dicts) for n in state_dicts[0]}


def test_rows_are_computed_from_the_averagers(monkeypatch, fresh_seed):
    settings = demo.Settings(trajectories=2, epochs=4, seed=fresh_seed % 1000, dropout=0.0, batch_size=64)
    SpyAverager.instances = []
    monkeypatch.setattr(averager, "WeightAverager", SpyAverager)
    report = demo.compare(settings, progress=False)

    data = demo.load_digits_data(settings.seed, torch.device("cpu"))
    model = demo.make_model(settings)

    def log_probs(params: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        update_bn([(data.x_train,)], model)  # dropout is 0: the statistics do not depend on any RNG
        model.eval()
        with torch.no_grad():
            return torch.log_softmax(model(data.x_test).double(), dim=1)

    def score(lp: torch.Tensor):
        return (lp.argmax(1) == data.y_test).double().mean().item() * 100, torch.nn.functional.nll_loss(
            lp, data.y_test).item()

    emas = [s for s in SpyAverager.instances if s.mode == "ema"]
    all_swas = [s for s in SpyAverager.instances if s.mode == "swa"]
    swas, sam_swas = all_swas[:settings.trajectories], all_swas[settings.trajectories:]  # SGD runs train first
    assert len(emas) == len(swas) == len(sam_swas) == settings.trajectories
    steps = math.ceil(len(data.x_train) / settings.batch_size)
    assert all(len(s.snapshots) == steps * settings.epochs for s in emas)
    assert all(len(s.snapshots) == settings.epochs - settings.swa_start_epoch for s in swas)
    assert all(len(s.snapshots) == settings.sam_epochs - settings.sam_swa_start_epoch for s in sam_swas)

    finals = [s.snapshots[-1] for s in emas]  # the EMA sees every step, the last one included
    ema_avgs = [oracle_ema(s.snapshots, settings.ema_decay) for s in emas]
    swa_avgs = [oracle_mean(s.snapshots) for s in swas]
    assert not torch.equal(swa_avgs[0]["0.weight"], finals[0]["0.weight"])

    def mean_score(state_dicts):
        rows = [score(log_probs(sd)) for sd in state_dicts]
        return [sum(r[i] for r in rows) / len(rows) for i in (0, 1)]

    final_probs = torch.stack([log_probs(sd).exp() for sd in finals]).mean(0)
    expected = {
        "SGD": mean_score(finals),
        "EMA": mean_score(ema_avgs),
        "SWA": mean_score(swa_avgs),
        "SAM + SWA": mean_score([oracle_mean(s.snapshots) for s in sam_swas]),
        "SWM": score(log_probs(oracle_mean(swa_avgs))),
        "ensemble": score(final_probs.clamp_min(1e-12).log()),
    }
    one_image = 100.0 / len(data.x_test)
    for prefix, (accuracy, nll) in expected.items():
        row = report.row(prefix)
        # float32 averages against float64 ones: an argmax may flip, on at most one test image per model
        assert abs(row.accuracy - accuracy) <= one_image + 1e-9, (prefix, row, accuracy)
        assert row.nll == pytest.approx(nll, rel=1e-5, abs=1e-7), (prefix, row, nll)
    swa_nll = [score(log_probs(sd))[1] for sd in swa_avgs]
    assert report.barrier_losses[0] == pytest.approx(swa_nll[0], rel=1e-5, abs=1e-7)
    assert report.barrier_losses[-1] == pytest.approx(swa_nll[1], rel=1e-5, abs=1e-7)
    assert report.barrier_losses[5] == pytest.approx(expected["SWM"][1], rel=1e-5, abs=1e-7)
    assert report.ema_updates == steps * settings.epochs * settings.trajectories
    assert report.timed_updates == steps * settings.epochs  # one trajectory timed against torch
    assert report.grad_evals == (steps * settings.epochs, 2 * steps * settings.sam_epochs)


def test_verdict_follows_the_numbers():
    rows = [demo.Row("SGD (last iterate, mean of K)", 97.0, 0.10, "1x"),
            demo.Row("EMA (mean of K)", 96.5, 0.09, "1x"),
            demo.Row("SWA (mean of K)", 97.5, 0.08, "1x"),
            demo.Row("SAM + SWA (mean of K, same grad evals)", 97.0, 0.11, "1x"),
            demo.Row("SWM merge of the 2 SWA averages", 96.0, 0.12, "1x"),
            demo.Row("ensemble of the 2 SGD models", 98.0, 0.07, "2x")]
    report = demo.Report(settings=demo.Settings(), n_train=1, n_test=1, n_params=1, rows=rows,
                         barrier_losses=(0.0,), barrier=0.0, fused_seconds=1.0, torch_seconds=1.0, ema_updates=1)
    text = demo.verdict(report)
    assert "EMA beat the SGD last iterate in NLL but not in accuracy (-0.50 points accuracy, -0.0100 NLL)." in text
    assert "SWA beat the SGD last iterate in both accuracy and NLL (+0.50 points accuracy, -0.0200 NLL)." in text
    assert "The SWM merge did not beat the SGD last iterate in accuracy or NLL" in text
    assert "SAM + SWA did not beat the SGD last iterate in accuracy or NLL (+0.00 points accuracy, +0.0100 NLL)." in text


def test_digits_are_scikit_learns():
    """The data file read directly is what sklearn.datasets.load_digits returns."""
    from sklearn.datasets import load_digits

    x, y = demo._digits()
    digits = load_digits()
    assert torch.equal(x, torch.tensor(digits.data, dtype=torch.float32)) and x.shape == (1797, 64)
    assert torch.equal(y, torch.tensor(digits.target, dtype=torch.long))


def test_missing_scikit_learn_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes finding and importing it fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["demo", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "swm-fused demo: error: the demo needs scikit-learn for its bundled digits data: " \
                  "pip install 'swm_fused[demo]'\n"
