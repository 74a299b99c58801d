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
    # Hugging Face save_pretrained layouts: safetensors shards with an index, one model.safetensors, torch shards.
    hf = {name: random_state_dict(HF_SHAPES) for name in ("hf_base", "hf_a", "hf_b")}
    write_hf_folder(root / "hf_base", hf["hf_base"], shards=3)
    write_hf_folder(root / "hf_a", hf["hf_a"], shards=1)
    write_hf_folder(root / "hf_b", hf["hf_b"], shards=2, torch_format=True)
    (root / "ties.yml").write_text(TIES_CONFIG.format(root=root))
    (root / "not_yaml.yml").write_text("merge_method: ties\nmodels: [{model: a.safetensors}\n")
    (root / "unknown_param.yml").write_text(f"merge_method: ties\nbase_model: {root}/hf_base\nmodels:\n"
                                            f"  - model: {root}/hf_a\n    parameters: {{densty: 0.5}}\n")
    (root / "missing_model.yml").write_text(f"merge_method: ties\nbase_model: {root}/hf_base\nmodels:\n"
                                            f"  - model: {root}/hf_a\n  - model: org/not-downloaded-7b\n")
    return SimpleNamespace(root=root, sds=sds, hf=hf, weights=[round(random.uniform(0.2, 2.0), 3) for _ in range(3)],
                           lambdas=[round(random.uniform(-0.5, 1.0), 3) for _ in range(2)])


HF_SHAPES = {"model.embed_tokens.weight": (11, 8), **{f"model.layers.{i}.mlp.weight": (8, 8) for i in range(3)},
             "model.norm.weight": (8,), "lm_head.weight": (11, 8)}
TIES_CONFIG = """merge_method: ties
base_model: {root}/hf_base
models:
  - model: {root}/hf_a
    parameters: {{weight: 0.6, density: [0.3, 0.9]}}
  - model: {root}/hf_b
    parameters: {{weight: 0.4, density: 0.5}}
parameters: {{normalize: true, lambda: 0.9, int8_mask: true}}
dtype: bfloat16
"""


def write_hf_folder(folder: Path, sd: Dict[str, torch.Tensor], shards: int, torch_format: bool = False) -> None:
    """A save_pretrained folder: model.safetensors, or shards plus their index (safetensors or torch files)."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    prefix, suffix = ("pytorch_model", ".bin") if torch_format else ("model", ".safetensors")
    if shards == 1:
        save_file(sd, str(folder / f"{prefix}{suffix}"))
        return
    keys = list(sd)
    names = [f"{prefix}-{i + 1:05d}-of-{shards:05d}{suffix}" for i in range(shards)]
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        part = {k: sd[k] for k in keys if weight_map[k] == name}
        torch.save(part, folder / name) if torch_format else save_file(part, str(folder / name))
    (folder / f"{prefix}{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def runs(workdir):
    """Start every command at once; return name -> Result once all have finished."""
    root = workdir.root
    a, b, c, base = (str(root / n) for n in ("a.safetensors", "b.safetensors", "c.pt", "base.safetensors"))
    hf_base, hf_a, hf_b = (str(root / n) for n in ("hf_base", "hf_a", "hf_b"))
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
        "config_ties": MERGE + ["--config", str(root / "ties.yml"), "-o", "{outdir}"],
        "flags_ties": MERGE + [hf_a, hf_b, "--method", "ties", "--density", "0.5", "--base", hf_base, "-o", "{outdir}"],
        "flags_dare": MERGE + [a, b, "--method", "dare-ties", "--density", "0.4", "--seed", "7", "--base", base,
                               "--rescale", "l1", "-o", "{out}"],
        "slerp_gradient": MERGE + [hf_a, hf_b, "--method", "slerp", "--t", "0", "0.8", "0.2", "-o", "{out}"],
        # usage errors (exit 2): the library's rules, reported with the usage line
        "config_not_yaml": MERGE + ["--config", str(root / "not_yaml.yml"), "-o", "{outdir}"],
        "config_unknown_param": MERGE + ["--config", str(root / "unknown_param.yml"), "-o", "{outdir}"],
        "config_with_inputs": MERGE + ["--config", str(root / "ties.yml"), a, "-o", "{outdir}"],
        "density_out_of_range": MERGE + [a, b, "--method", "ties", "--base", base, "--density", "1.5", "-o", "{out}"],
        "slerp_three": MERGE + [a, b, c, "--method", "slerp", "--t", "0.5", "-o", "{out}"],
        "t_out_of_range": MERGE + [a, b, "--method", "slerp", "--t", "1.2", "-o", "{out}"],
        "ties_without_base": MERGE + [a, b, "--method", "ties", "--density", "0.5", "-o", "{out}"],
        "unknown_method": MERGE + [a, b, "--method", "tiez", "-o", "{out}"],
        "unknown_parameter": MERGE + [a, b, "--density", "0.5", "-o", "{out}"],  # linear takes no density
        # bad input (exit 1)
        "ties_shape": MERGE + [a, str(root / "shape.safetensors"), "--method", "ties", "--base", base, "-o", "{out}"],
        "config_missing_model": MERGE + ["--config", str(root / "missing_model.yml"), "-o", "{outdir}"],
    }
    procs = {}
    for name, command in commands.items():
        out = root / (f"out_{name}" if "{outdir}" in command else f"out_{name}.safetensors")
        command = [part.replace("{out}", str(out)).replace("{outdir}", str(out)) for part in command]
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


@pytest.mark.parametrize("name,message", [("no_output", "-o/--output"), ("task_without_base", "requires --base"),
                                          ("weight_count", "got 2 weights for 3 models")])
def test_usage_errors_exit_2(runs, name, message):
    result = runs[name]
    assert result.returncode == 2
    assert message in result.stderr and "usage:" in result.stderr
    assert not result.out.exists()


@pytest.mark.parametrize("extra,message", [(["--dtype", "fp8"], "invalid choice"),
                                           (["--method", "task-arithmetic", "--base", "a.safetensors"],
                                            "requires --weights"),
                                           (["--method", "ties", "--base", "a.safetensors", "--density", "1.5"],
                                            "density must be in (0, 1]"),
                                           (["--base", "a.safetensors"], "'linear' does not use a base model")])
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
    ("output_is_input", "would overwrite the input"),
    ("ties_shape", "shape mismatch for tensor 'head.weight'"),
    ("config_missing_model", "org/not-downloaded-7b: no such file or folder"),
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
    real_write, written = merge.writer._write_tensor, []

    def write_then_stop(file, tensor):
        real_write(file, tensor)
        written.append(1)
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler run() installs turns this into SystemExit
        raise KeyboardInterrupt

    monkeypatch.setattr(merge.writer, "_write_tensor", write_then_stop)
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


# --------------------------------------------------------------------------- methods, configs and folders

def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_tensors(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_config_merge_of_save_pretrained_folders_keeps_the_sharding(workdir, runs, tmp_path):
    result = runs["config_ties"]
    assert result.returncode == 0, result.stderr
    root = workdir.root
    base_index = json.loads((root / "hf_base" / "model.safetensors.index.json").read_text())
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the base's three shards, same names
    assert sorted(p.name for p in result.out.iterdir()) == sorted({*base_index["weight_map"].values(),
                                                                   "model.safetensors.index.json"})
    assert index["metadata"]["swm_fused.config"] == (root / "ties.yml").read_text()
    in_process = tmp_path / "in_process"
    merge.merge_config(root / "ties.yml", in_process)
    assert_same_tensors(read_tensors(result.out), read_tensors(in_process))
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(result.out).values() if t.is_floating_point())


def test_ties_flags_on_folders_match_the_library(workdir, runs):
    result = runs["flags_ties"]
    assert result.returncode == 0, result.stderr
    hf = workdir.hf
    expected = merge.ties(hf["hf_base"], [hf["hf_a"], hf["hf_b"]], density=0.5)
    assert_same_tensors(read_tensors(result.out), expected)
    assert (result.out / "model.safetensors.index.json").exists()  # hf_base is sharded: so is the output


def test_dare_flags_are_reproducible_from_the_seed(workdir, runs):
    result = runs["flags_dare"]
    assert result.returncode == 0, result.stderr
    sds = workdir.sds
    expected = merge.dare_ties(sds["base"], [sds["a"], sds["b"]], density=0.4, seed=7, rescale="l1")
    assert_same_tensors(read_tensors(result.out), expected)
    with safe_open(str(result.out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["swm_fused.seed"] == "7" and metadata["swm_fused.method"] == "dare_ties"
    assert json.loads(metadata["swm_fused.config"])["parameters"] == {"density": 0.4, "rescale": "l1", "seed": 7}


def test_slerp_t_gradient_flag(workdir, runs):
    result = runs["slerp_gradient"]
    assert result.returncode == 0, result.stderr
    hf = workdir.hf
    assert_same_tensors(read_tensors(result.out), merge.slerp(hf["hf_a"], hf["hf_b"], [0.0, 0.8, 0.2]))


@pytest.mark.parametrize("name,message", [
    ("config_not_yaml", "not valid YAML (line 3"),
    ("config_unknown_param", "unknown parameter 'densty' for method 'ties'"),
    ("config_with_inputs", "--config describes the whole merge; drop IN"),
    ("density_out_of_range", "density must be in (0, 1], got 1.5"),
    ("slerp_three", "exactly two models, got 3"),
    ("t_out_of_range", "t must be in [0, 1], got 1.2"),
    ("ties_without_base", "'ties' needs a base model"),
    ("unknown_method", "invalid choice: 'tiez'"),
    ("unknown_parameter", "unknown parameter 'density' for method 'linear'"),
])
def test_bad_merge_requests_are_usage_errors(workdir, runs, name, message):
    result = runs[name]
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and message in result.stderr, result.stderr
    assert not result.out.exists() and not leftovers(workdir.root)


def test_help_lists_the_library_choices(runs):
    text = runs["help"].stdout
    for name in merge.METHODS:
        assert name in text
    for flag in ("--config", "--density", "--gamma", "--epsilon", "--lambda", "--t", "--majority-sign",
                 "--rescale", "--filter-wise", "--seed"):
        assert flag in text
    assert "fp64" in text  # the CLI offers every dtype the library takes
