"""`python -m swm_fused merge` as a real subprocess on real checkpoint files.

Every command starts at once in a module fixture (each process spends most of its time
importing torch), and the tests then check exit codes, stderr and the files left behind.
Interrupts are simulated in-process, through the same cli.main entry point.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swm_fused import cli, merge
from swm_fused.merge import load_state_dict

FP32_EPS = torch.finfo(torch.float32).eps
REPO = Path(__file__).resolve().parents[1]
# Processes run side by side: one intra-op thread each keeps them from fighting over cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
MERGE = [sys.executable, "-m", "swm_fused", "merge"]


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    out: Path


def random_state_dict(shapes: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    sd = {key: torch.randn(shape) for key, shape in shapes.items()}
    sd["bn.num_batches_tracked"] = torch.randint(0, 100, ())
    return sd


SHAPES = {"fc.weight": (16, 8), "fc.bias": (16,), "head.weight": (3, 16)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Input files (good and bad), the state dicts behind them, and the weights the commands use."""
    root = tmp_path_factory.mktemp("merge_cli")
    sds = {name: random_state_dict(SHAPES) for name in ("a", "b", "c", "base")}
    save_file(sds["a"], str(root / "a.safetensors"))
    save_file(sds["b"], str(root / "b.safetensors"))
    torch.save(sds["c"], root / "c.pt")
    save_file(sds["base"], str(root / "base.safetensors"))
    renamed = {"fc.weight": (16, 8), "fc.kernel": (16,), "head.weight": (3, 16)}
    save_file(random_state_dict(renamed), str(root / "keys.safetensors"))
    save_file(random_state_dict(dict(SHAPES, **{"head.weight": (4, 16)})), str(root / "shape.safetensors"))
    (root / "corrupt.safetensors").write_bytes(os.urandom(256))
    return SimpleNamespace(root=root, sds=sds, weights=[round(random.uniform(0.2, 2.0), 3) for _ in range(3)],
                           lambdas=[round(random.uniform(-0.5, 1.0), 3) for _ in range(2)])


@pytest.fixture(scope="module")
def runs(workdir):
    """Start every command at once; return name -> Result once all have finished."""
    root = workdir.root
    a, b, c, base = (str(root / n) for n in ("a.safetensors", "b.safetensors", "c.pt", "base.safetensors"))
    weights, lambdas = [str(w) for w in workdir.weights], [str(x) for x in workdir.lambdas]
    commands = {
        "linear": MERGE + [a, b, c, "-o", "{out}", "--weights", *weights, "--dtype", "bf16"],
        "task": MERGE + [a, c, "-o", "{out}", "--method", "task-arithmetic", "--base", base, "--weights", *lambdas],
        "help": MERGE + ["--help"],
        "no_output": MERGE + [a, b],
        "task_without_base": MERGE + [a, b, "-o", "{out}", "--method", "task-arithmetic", "--weights", "1", "1"],
        "missing": MERGE + [a, str(root / "missing.safetensors"), "-o", "{out}"],
        "corrupt": MERGE + [a, str(root / "corrupt.safetensors"), "-o", "{out}"],
        "keys": MERGE + [a, str(root / "keys.safetensors"), "-o", "{out}"],
        "shape": MERGE + [a, str(root / "shape.safetensors"), "-o", "{out}"],
        "weight_count": MERGE + [a, b, c, "-o", "{out}", "--weights", "1", "2"],
        "output_is_input": MERGE + [a, b, "-o", "./b.safetensors"],  # cwd is root: same file, other spelling
    }
    procs = {}
    for name, command in commands.items():
        out = root / f"out_{name}.safetensors"
        command = [part.replace("{out}", str(out)) for part in command]
        procs[name] = (out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             env=ENV, cwd=root))
    results = {}
    for name, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = Result(proc.returncode, stdout, stderr, out)
    return results


def leftovers(root: Path) -> List[str]:
    return [name for name in os.listdir(root) if name.endswith(".tmp")]


def test_linear_merge_writes_the_weighted_average(workdir, runs):
    root, sds = workdir.root, workdir.sds
    result = runs["linear"]
    assert result.returncode == 0, result.stderr
    merged = load_state_dict(result.out)
    applied = [w / sum(workdir.weights) for w in workdir.weights]
    for key, first in sds["a"].items():
        if not first.is_floating_point():
            assert torch.equal(merged[key], first)
            continue
        assert merged[key].dtype == torch.bfloat16
        terms = torch.stack([w * sds[n][key].double() for w, n in zip(applied, "abc")])
        exact = terms.sum(0)
        bound = 2 ** -8 * exact.abs() + 8 * FP32_EPS * terms.abs().sum(0) + 1e-30  # bf16 rounding + fp32 sums
        err = (merged[key].double() - exact).abs()
        assert bool((err <= bound).all()), f"{key}: max error {err.max().item():.3g}"
    with safe_open(str(result.out), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["swm_fused.inputs"]) == [str(root / n) for n in ("a.safetensors", "b.safetensors",
                                                                                 "c.pt")]
    assert json.loads(metadata["swm_fused.weights"]) == pytest.approx(applied)


def test_task_arithmetic_merge(workdir, runs):
    sds, lambdas = workdir.sds, workdir.lambdas
    result = runs["task"]
    assert result.returncode == 0, result.stderr
    merged = load_state_dict(result.out)
    for key, base in sds["base"].items():
        if not base.is_floating_point():
            assert torch.equal(merged[key], base)
            continue
        b = base.double()
        exact = b + sum(lam * (sds[n][key].double() - b) for lam, n in zip(lambdas, "ac"))
        scale = b.abs() * (1 + sum(map(abs, lambdas))) + sum(abs(lam) * sds[n][key].double().abs()
                                                             for lam, n in zip(lambdas, "ac"))
        err = (merged[key].double() - exact).abs()
        assert bool((err <= 8 * FP32_EPS * scale + 1e-30).all()), f"{key}: max error {err.max().item():.3g}"


def test_help(runs):
    result = runs["help"]
    assert result.returncode == 0
    for flag in ("-o OUT", "--weights", "--method", "--base", "--dtype", "--device", "--no-normalize"):
        assert flag in result.stdout


@pytest.mark.parametrize("name,message", [("no_output", "-o/--output"), ("task_without_base", "requires --base")])
def test_usage_errors_exit_2(runs, name, message):
    result = runs[name]
    assert result.returncode == 2
    assert message in result.stderr and "usage:" in result.stderr
    assert not result.out.exists()


@pytest.mark.parametrize("extra,message", [(["--dtype", "fp8"], "invalid choice"),
                                           (["--method", "task-arithmetic", "--base", "a.safetensors"],
                                            "requires --weights"),
                                           (["--method", "task-arithmetic", "--base", "a.safetensors", "--weights",
                                             "1", "1", "--no-normalize"], "linear only"),
                                           (["--base", "a.safetensors"], "only used with --method task-arithmetic")])
def test_more_usage_errors_in_process(workdir, capsys, extra, message):
    out = workdir.root / "out_usage.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", str(workdir.root / "a.safetensors"), str(workdir.root / "b.safetensors"),
                  "-o", str(out), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name,message", [
    ("missing", "missing.safetensors: no such file"),
    ("corrupt", "corrupt.safetensors: not a valid safetensors file"),
    ("keys", "lacks 'fc.bias'"),
    ("shape", "shape mismatch for tensor 'head.weight'"),
    ("weight_count", "got 2 weights for 3 models"),
    ("output_is_input", "would overwrite the input"),
])
def test_bad_input_one_line_and_no_output(workdir, runs, name, message):
    result = runs[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("swm-fused merge: error: ") and message in lines[0], lines
    assert not result.out.exists() and not leftovers(workdir.root)
    if name == "output_is_input":  # the input is untouched
        intact = load_state_dict(workdir.root / "b.safetensors")
        assert all(torch.equal(intact[k], v) for k, v in workdir.sds["b"].items())


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupted_merge_leaves_nothing(workdir, monkeypatch, capsys, how):
    root = workdir.root
    out = root / f"out_{how}.safetensors"
    real_write, written = merge._write_tensor, []

    def write_then_stop(file, tensor):
        real_write(file, tensor)
        written.append(1)
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler run() installs turns this into SystemExit
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_write_tensor", write_then_stop)
    handler_before = signal.getsignal(signal.SIGTERM)
    args = ["merge", str(root / "a.safetensors"), str(root / "b.safetensors"), str(root / "c.pt"), "-o", str(out)]
    if how == "sigterm":
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        assert exit_info.value.code == 128 + signal.SIGTERM
    else:
        assert cli.main(args) == 130
        assert capsys.readouterr().err.strip() == "swm-fused merge: interrupted; no output written"
    assert written == [1] and not out.exists() and not leftovers(root)
    assert signal.getsignal(signal.SIGTERM) is handler_before
