"""swm_fused.merge: in-memory merges, soups, checkpoint loading and streamed file merges.

Every merge is checked against float64 math on the same random tensors, with an error bound
for float32 accumulation plus one rounding into the output dtype.
"""
from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from swm_fused import merge as M

FP32_EPS = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = {"fc.weight": (7, 3), "fc.bias": (4097,), "scale": (), "empty": (0, 5), "conv.weight": (2, 3, 4)}


def random_state_dict(dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """Odd shapes, a non-contiguous view, an int buffer and a bool mask, all fresh random data."""
    sd = {key: torch.randn(shape).to(dtype) for key, shape in SHAPES.items()}
    sd["transposed"] = torch.randn(5, 6).to(dtype).t()  # non-contiguous
    sd["bn.num_batches_tracked"] = torch.randint(0, 1000, ())
    sd["mask"] = torch.rand(9) > 0.5
    return sd


def random_weights(count: int, normalize: bool) -> List[float]:
    """Mixed-sign weights; when they will be normalized, keep their sum away from 0."""
    while True:
        weights = [random.uniform(-1.5, 1.5) for _ in range(count)]
        if not normalize or abs(sum(weights)) > 0.3:
            return weights


def applied_weights(weights: Optional[Sequence[float]], count: int, normalize: bool) -> List[float]:
    if weights is None:
        return [1.0 / count] * count
    return [w / sum(weights) for w in weights] if normalize else list(weights)


def check_against_float64(result: Mapping[str, Tensor], state_dicts: Sequence[Mapping[str, Tensor]],
                          weights: Sequence[float], out_dtype: Optional[torch.dtype] = None) -> None:
    """result[key] == sum_k w_k sd_k[key] up to fp32 accumulation and one rounding into the output dtype."""
    first = state_dicts[0]
    assert list(result) == list(first)
    for key, template in first.items():
        got = result[key]
        assert got.shape == template.shape, key
        if not template.is_floating_point():
            assert got.dtype == template.dtype and torch.equal(got, template), key
            continue
        expected_dtype = out_dtype or template.dtype
        assert got.dtype == expected_dtype, f"{key}: {got.dtype} != {expected_dtype}"
        terms = torch.stack([w * sd[key].double() for w, sd in zip(weights, state_dicts)])
        exact = terms.sum(0)
        finfo = torch.finfo(expected_dtype)
        bound = (finfo.eps * exact.abs() + 2 * (len(weights) + 1) * FP32_EPS * terms.abs().sum(0)
                 + finfo.smallest_normal * finfo.eps)
        err = (got.double() - exact).abs()
        assert bool((err <= bound).all()), f"{key}: max error {err.max().item():.3g}, bound at worst element " \
                                           f"{bound.flatten()[int((err - bound).argmax())].item():.3g}"


# --------------------------------------------------------------------------- merge_state_dicts

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_merge_state_dicts_matches_float64(count, dtype, normalize):
    sds = [random_state_dict(dtype) for _ in range(count)]
    weights = random_weights(count, normalize)
    result = M.merge_state_dicts(sds, weights, normalize=normalize)
    check_against_float64(result, sds, applied_weights(weights, count, normalize))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, "bf16"],
                         ids=str)
def test_merge_state_dicts_output_dtype_and_mixed_inputs(out_dtype):
    sds = [random_state_dict(dt) for dt in (torch.bfloat16, torch.float32, torch.float16)]
    result = M.merge_state_dicts(sds, dtype=out_dtype)
    expected = torch.bfloat16 if out_dtype == "bf16" else out_dtype
    check_against_float64(result, sds, [1 / 3] * 3, out_dtype=expected)


def test_default_weights_are_uniform_and_output_owns_its_memory():
    sds = [random_state_dict() for _ in range(3)]
    result = M.merge_state_dicts(sds)
    check_against_float64(result, sds, [1 / 3] * 3)
    single = M.merge_state_dicts(sds[:1])
    for key, tensor in single.items():
        if tensor.numel():
            assert tensor.data_ptr() != sds[0][key].data_ptr(), key


def test_float8_inputs_merge_into_a_chosen_dtype():
    sds = [{"w": torch.randn(33).to(torch.float8_e4m3fn)} for _ in range(2)]
    with pytest.raises(TypeError, match="'w'.*float8"):
        M.merge_state_dicts(sds)
    check_against_float64(M.merge_state_dicts(sds, dtype=torch.float32), sds, [0.5, 0.5], torch.float32)


def test_zero_sum_weights_without_normalize():
    sds = [random_state_dict() for _ in range(2)]
    result = M.merge_state_dicts(sds, [1.0, -1.0], normalize=False)
    check_against_float64(result, sds, [1.0, -1.0])


def test_bad_inputs_raise_one_clear_error():
    sds = [random_state_dict() for _ in range(3)]
    renamed = dict(sds[2])
    renamed["extra.weight"] = renamed.pop("fc.weight")
    with pytest.raises(ValueError, match=r"state_dicts\[2\].*lacks 'fc.weight'.*extra 'extra.weight'"):
        M.merge_state_dicts([sds[0], sds[1], renamed])
    reshaped = dict(sds[1], **{"fc.bias": torch.randn(4096)})
    with pytest.raises(ValueError, match=r"shape mismatch for tensor 'fc.bias'.*\[4097\].*\[4096\]"):
        M.merge_state_dicts([sds[0], reshaped])
    retyped = dict(sds[1], scale=torch.tensor(3))
    with pytest.raises(ValueError, match="'scale'"):
        M.merge_state_dicts([sds[0], retyped])
    with pytest.raises(ValueError, match="2 weights for 3"):
        M.merge_state_dicts(sds, [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 0"):
        M.merge_state_dicts(sds[:2], [1.0, -1.0])
    with pytest.raises(ValueError, match="finite"):
        M.merge_state_dicts(sds[:2], [1.0, float("nan")])
    with pytest.raises(TypeError, match="'step'.*int"):
        M.merge_state_dicts([dict(sds[0], step=3), dict(sds[1], step=3)])
    with pytest.raises(TypeError, match="non-empty"):
        M.merge_state_dicts([])
    with pytest.raises(TypeError, match="dtype"):
        M.merge_state_dicts(sds, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype"):
        M.merge_state_dicts(sds, dtype="fp8")


# --------------------------------------------------------------------------- task arithmetic and soups

@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_task_arithmetic_matches_its_formula(count, dtype):
    base = random_state_dict(dtype)
    finetuned = [random_state_dict(dtype) for _ in range(count)]
    lambdas = [random.uniform(-1.0, 1.5) for _ in range(count)]
    result = M.task_arithmetic(base, finetuned, lambdas)
    for key, template in base.items():
        if not template.is_floating_point():
            assert torch.equal(result[key], template)
            continue
        assert result[key].dtype == dtype
        b = template.double()
        exact = b + sum(lam * (sd[key].double() - b) for lam, sd in zip(lambdas, finetuned))
        scale = abs(1 - sum(lambdas)) * b.abs() + sum(abs(lam) * sd[key].double().abs()
                                                      for lam, sd in zip(lambdas, finetuned))
        finfo = torch.finfo(dtype)
        bound = finfo.eps * exact.abs() + 2 * (count + 2) * FP32_EPS * scale + finfo.smallest_normal
        assert bool(((result[key].double() - exact).abs() <= bound).all()), key


def test_task_arithmetic_scalar_lambda_and_errors():
    base, a, b = (random_state_dict() for _ in range(3))
    lam = random.uniform(0.1, 1.0)
    check_against_float64(M.task_arithmetic(base, [a, b], lam, dtype="fp16"), [base, a, b],
                          [1 - 2 * lam, lam, lam], out_dtype=torch.float16)
    with pytest.raises(ValueError, match="1 lambdas for 2"):
        M.task_arithmetic(base, [a, b], [0.5])
    with pytest.raises(TypeError, match="finetuned"):
        M.task_arithmetic(base, a, 0.5)
    reshaped = dict(b, **{"fc.weight": torch.randn(3, 7)})
    with pytest.raises(ValueError, match=r"'fc.weight'.*base.*finetuned\[1\]"):
        M.task_arithmetic(base, [a, reshaped], 0.5)


def test_uniform_soup_is_the_plain_average():
    sds = [random_state_dict() for _ in range(4)]
    check_against_float64(M.uniform_soup(sds), sds, [0.25] * 4)
    check_against_float64(M.uniform_soup(sds, dtype=torch.bfloat16), sds, [0.25] * 4, torch.bfloat16)


def _greedy_problem():
    """A target T and three models whose greedy soup is known: A and B cancel, C only hurts."""
    target = torch.randn(64, dtype=torch.float64)
    d = torch.randn(64, dtype=torch.float64)
    d /= d.norm()
    u = torch.randn(64, dtype=torch.float64)
    u -= (u @ d) * d
    u /= u.norm()

    def model(offset, step):
        return {"w": (target + offset).float(), "bn.num_batches_tracked": torch.tensor(step)}

    def score(sd):  # held-out score: minus the squared distance to the target, from the state dict itself
        return -float(((sd["w"].double() - target) ** 2).sum())

    a, b, c = model(d, 1), model(-1.2 * d, 2), model(3 * u, 3)  # scores -1, -1.44, -9
    return a, b, c, score


def test_greedy_soup_adds_only_models_that_help():
    a, b, c, score = _greedy_problem()
    # Visiting in list order instead of by score would keep all three; sorting keeps A then B.
    soup, chosen = M.greedy_soup([c, b, a], score)
    assert chosen == [2, 1]
    check_against_float64(soup, [a, b], [0.5, 0.5])  # num_batches_tracked comes from A, the best model
    assert score(soup) > score(a)


def test_greedy_soup_keeps_a_model_that_does_not_lower_the_score():
    a, _, c, score = _greedy_problem()
    soup, chosen = M.greedy_soup([a, dict(a), c], score)
    assert chosen == [0, 1]  # the copy ties the soup's score, and a tie is not a drop
    check_against_float64(soup, [a, a], [0.5, 0.5])


def test_greedy_soup_rejects_a_nan_score():
    a, b, c, _ = _greedy_problem()
    with pytest.raises(ValueError, match="score"):
        M.greedy_soup([a, b], lambda sd: float("nan"))


# --------------------------------------------------------------------------- load_state_dict

def write_sharded(folder: Path, sd: Mapping[str, Tensor], torch_shards: bool = False) -> Path:
    """Split ``sd`` over two shards plus an index, the layout Hugging Face writes."""
    folder.mkdir()
    keys = list(sd)
    suffix = ".bin" if torch_shards else ".safetensors"
    names = [f"model-0000{i}-of-00002{suffix}" for i in (1, 2)]
    weight_map = {key: names[i * 2 // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        part = {k: sd[k].contiguous() for k in keys if weight_map[k] == name}
        torch.save(part, folder / name) if torch_shards else save_file(part, str(folder / name))
    index = "pytorch_model.bin.index.json" if torch_shards else M.SAFETENSORS_INDEX
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def save_as(path: Path, sd: Mapping[str, Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif path.suffix:
        torch.save(dict(sd), path)
    else:
        write_sharded(path, sd)
    return path


def assert_same_state_dict(loaded: Mapping[str, Tensor], original: Mapping[str, Tensor]) -> None:
    assert sorted(loaded) == sorted(original)
    for key, tensor in original.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "m.bin", "sharded", "torch_sharded"])
def test_load_state_dict_round_trips(tmp_path, name):
    sd = random_state_dict(torch.bfloat16)
    sd.update({"fp16": torch.randn(5).half(), "fp64": torch.randn(2, 2).double(), "int8": torch.randint(-9, 9, (4,),
              dtype=torch.int8)})
    if name == "torch_sharded":
        path = write_sharded(tmp_path / name, sd, torch_shards=True)
    else:
        path = save_as(tmp_path / name, sd)
    assert_same_state_dict(M.load_state_dict(path), sd)


def test_load_state_dict_bad_files(tmp_path):
    good = save_as(tmp_path / "good.safetensors", random_state_dict())
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        M.load_state_dict(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match=re.escape(f"{garbage}: not a valid safetensors")):
        M.load_state_dict(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: not a valid safetensors")):
        M.load_state_dict(truncated)
    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="not JSON"):
        M.load_state_dict(bad_json)
    corrupt_pt = tmp_path / "corrupt.pt"
    corrupt_pt.write_bytes(os.urandom(500))
    with pytest.raises(ValueError, match=re.escape(f"{corrupt_pt}: cannot load as a torch checkpoint")):
        M.load_state_dict(corrupt_pt)
    nested = tmp_path / "nested.pt"
    torch.save({"model": random_state_dict(), "epoch": 3}, nested)
    with pytest.raises(ValueError, match="'model' is a dict, not a tensor"):
        M.load_state_dict(nested)
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        M.load_state_dict(unknown)
    (tmp_path / "no_index").mkdir()
    with pytest.raises(ValueError, match="no_index.*model.safetensors.index.json"):
        M.load_state_dict(tmp_path / "no_index")


def test_load_state_dict_checks_the_shard_index(tmp_path):
    folder = write_sharded(tmp_path / "sharded", random_state_dict())
    index_path = folder / M.SAFETENSORS_INDEX
    index = json.loads(index_path.read_text())
    first_key = next(iter(index["weight_map"]))
    moved = dict(index, weight_map={k: v.replace("00001", "00002") if k == first_key else v
                                    for k, v in index["weight_map"].items()})
    index_path.write_text(json.dumps(moved))
    with pytest.raises(ValueError, match=f"puts tensor '{first_key}'"):
        M.load_state_dict(folder)
    index_path.write_text(json.dumps(dict(index, weight_map={k: v for k, v in index["weight_map"].items()
                                                            if k != first_key})))
    with pytest.raises(ValueError, match=f"does not list: '{first_key}'"):
        M.load_state_dict(folder)
    index_path.write_text("[]")
    with pytest.raises(ValueError, match="not a valid shard index"):
        M.load_state_dict(folder)


# --------------------------------------------------------------------------- merge_files

def read_output(path: Path):
    """The output as safetensors itself reads it: tensors, metadata and the raw header."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return tensors, metadata, header


def make_inputs(tmp_path: Path, count: int, dtype: torch.dtype = torch.float32):
    """``count`` random checkpoints, cycling through safetensors, .pt and a sharded folder."""
    sds = [random_state_dict(dtype) for _ in range(count)]
    paths = [save_as(tmp_path / [f"in{k}.safetensors", f"in{k}.pt", f"in{k}"][k % 3], sd) for k, sd in enumerate(sds)]
    return sds, paths


def in_order(tensors: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The output's tensors in ``like``'s key order (the file stores the widest dtypes first)."""
    assert set(tensors) == set(like)
    return {key: tensors[key] for key in like}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float16, torch.float32), (torch.float32, "bf16")], ids=str)
def test_merge_files_matches_merge_state_dicts(tmp_path, dtype, out_dtype, normalize):
    sds, paths = make_inputs(tmp_path, 4, dtype)
    weights = random_weights(4, normalize)
    out = tmp_path / "merged.safetensors"
    M.merge_files(paths, out, weights, dtype=out_dtype, normalize=normalize)
    tensors, metadata, header = read_output(out)
    expected_dtype = torch.bfloat16 if out_dtype == "bf16" else out_dtype
    applied = applied_weights(weights, 4, normalize)
    check_against_float64(in_order(tensors, sds[0]), sds, applied, expected_dtype)
    in_memory = M.merge_state_dicts([M.load_state_dict(p) for p in paths], weights, normalize=normalize,
                                    dtype=out_dtype)
    for key, tensor in in_memory.items():
        torch.testing.assert_close(tensors[key], tensor, rtol=0, atol=0)
    assert metadata["format"] == "pt" and metadata["swm_fused.method"] == "linear"
    assert json.loads(metadata["swm_fused.inputs"]) == [str(p) for p in paths]
    assert json.loads(metadata["swm_fused.weights"]) == pytest.approx(applied)
    for key, entry in header.items():  # every tensor starts aligned to its element size
        if key != "__metadata__":
            assert entry["data_offsets"][0] % tensors[key].element_size() == 0, key


def test_merge_files_task_arithmetic(tmp_path):
    (base, *finetuned), (base_path, *paths) = make_inputs(tmp_path, 3, torch.bfloat16)
    lambdas = [random.uniform(-0.5, 1.0) for _ in finetuned]
    out = tmp_path / "tasks.safetensors"
    M.merge_files(paths, out, lambdas, method="task-arithmetic", base=base_path, dtype="fp32")
    tensors, metadata, _ = read_output(out)
    check_against_float64(in_order(tensors, base), [base, *finetuned], [1 - sum(lambdas), *lambdas],
                          torch.float32)
    assert metadata["swm_fused.method"] == "task_arithmetic"  # canonical names use _
    assert metadata["swm_fused.base"] == str(base_path)
    assert json.loads(metadata["swm_fused.weights"]) == pytest.approx(lambdas)
    assert json.loads(metadata["swm_fused.base_weight"]) == pytest.approx(1 - sum(lambdas))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_files_on_cuda_matches_cpu(tmp_path):
    sds, paths = make_inputs(tmp_path, 3, torch.bfloat16)
    weights = random_weights(3, normalize=True)
    M.merge_files(paths, tmp_path / "gpu.safetensors", weights, device="cuda", dtype="fp32")
    tensors = in_order(read_output(tmp_path / "gpu.safetensors")[0], sds[0])
    check_against_float64(tensors, sds, applied_weights(weights, 3, True), torch.float32)


def test_merge_files_replaces_an_existing_output_and_shows_progress(tmp_path, capsys):
    sds, paths = make_inputs(tmp_path, 2)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    M.merge_files(paths, out, progress=True)
    assert "merging 2 checkpoints" in capsys.readouterr().err
    check_against_float64(in_order(read_output(out)[0], sds[0]), sds, [0.5, 0.5])
    M.merge_files(paths, out, progress=False)
    assert capsys.readouterr().err == ""


def test_merge_files_validates_before_writing(tmp_path):
    sds, paths = make_inputs(tmp_path, 3)
    a, pt, sharded = paths
    out = tmp_path / "out.safetensors"
    bad_keys = save_as(tmp_path / "keys.safetensors", {("other" if k == "fc.bias" else k): v
                                                        for k, v in sds[0].items()})
    bad_shape = save_as(tmp_path / "shape.safetensors", dict(sds[0], **{"conv.weight": torch.randn(2, 3, 5)}))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    shard = next(sharded.glob("*.safetensors"))
    cases = [
        (dict(paths=[a, bad_keys], out_path=out), ValueError, "lacks 'fc.bias'.*extra 'other'"),
        (dict(paths=[a, bad_shape], out_path=out), ValueError, r"'conv.weight'.*\[2, 3, 4\].*\[2, 3, 5\]"),
        (dict(paths=paths, out_path=out, weights=[1.0, 2.0]), ValueError, "2 weights for 3"),
        (dict(paths=[a, pt], out_path=a), ValueError, "would overwrite the input"),
        (dict(paths=[a, pt], out_path=f"{tmp_path}/./{a.name}"), ValueError, "would overwrite the input"),
        (dict(paths=[link, pt], out_path=a), ValueError, "would overwrite the input"),
        (dict(paths=[a, sharded], out_path=shard), ValueError, "would overwrite the input"),
        (dict(paths=[a, tmp_path / "nope.pt"], out_path=out), FileNotFoundError, "nope.pt"),
        (dict(paths=[a, garbage], out_path=out), ValueError, "garbage.safetensors: not a valid"),
        (dict(paths=[a, pt], out_path=tmp_path / "out.pt"), ValueError, "must be a .safetensors file"),
        (dict(paths=[a, pt], out_path=tmp_path / "no" / "out.safetensors"), FileNotFoundError, "does not exist"),
        (dict(paths=[a, pt], out_path=out, base=a), ValueError, "'linear' does not use a base model"),
        (dict(paths=[a, pt], out_path=out, weights=[1, 1], method="task-arithmetic"), ValueError, "needs a base"),
        (dict(paths=[a, pt], out_path=out, method="task-arithmetic", base=sharded), ValueError, "lambda"),
        (dict(paths=[a, pt], out_path=out, method="ties-magic"), ValueError, "unknown method"),
        (dict(paths=[a, pt], out_path=out, weights=[1, -1]), ValueError, "sum to 0"),
        (dict(paths=[a, pt], out_path=out, dtype="int8"), ValueError, "unknown dtype"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(paths=[a, pt], out_path=out, device="cuda"), ValueError, "CUDA is not available"))
    before = sorted(os.listdir(tmp_path))
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            M.merge_files(**kwargs)
        assert sorted(os.listdir(tmp_path)) == before, kwargs
    assert a.read_bytes()  # the input the bad calls pointed at is intact
    assert_same_state_dict(M.load_state_dict(a), {k: v.contiguous() for k, v in sds[0].items()})


@pytest.mark.parametrize("existing", [True, False], ids=["over-old-output", "fresh"])
@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_merge_files_is_atomic(tmp_path, monkeypatch, interrupt, existing):
    _, paths = make_inputs(tmp_path, 3)
    out = tmp_path / "merged.safetensors"
    if existing:
        out.write_bytes(b"previous result")
    before = sorted(os.listdir(tmp_path))
    seen = []
    real_write = M.writer._write_tensor

    def fail_after_first(file, tensor):
        if seen:
            raise interrupt
        real_write(file, tensor)
        seen.append(os.listdir(tmp_path))

    monkeypatch.setattr(M.writer, "_write_tensor", fail_after_first)
    with pytest.raises(type(interrupt)):
        M.merge_files(paths, out)
    assert len(seen) == 1 and any(name.endswith(".tmp") for name in seen[0])  # it failed mid-write
    assert sorted(os.listdir(tmp_path)) == before
    if existing:
        assert out.read_bytes() == b"previous result"


# --------------------------------------------------------------------------- streaming memory bound

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from swm_fused import merge as M

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    def peak_growth(fn):
        # Writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before

    out, paths = sys.argv[1], sys.argv[2:]
    M.merge_files(paths[:1], out, progress=False)  # warm up imports and lazy initialisation
    streamed = peak_growth(lambda: M.merge_files(paths, out, progress=False))
    in_memory = peak_growth(lambda: M.merge_state_dicts([M.load_state_dict(p) for p in paths]))
    print(json.dumps({"streamed": streamed, "in_memory": in_memory}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_merge_files_streams_with_bounded_memory(tmp_path):
    """Peak RSS growth stays under (K+1) x the largest tensor + a constant, for inputs far larger.

    Measured in a fresh process that never held the data, from VmHWM after resetting it with
    /proc/self/clear_refs: the kernel's exact high-water mark of resident memory, which counts
    both allocations and touched pages of memory-mapped inputs. The same measurement of an
    in-memory merge must exceed the bound, which shows the test can fail.
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS through /proc/self/clear_refs")
    tensor_bytes, count = 1 << 20, 64  # 64 tensors of 1 MiB: 64 MiB per checkpoint
    paths = []
    for k, name in enumerate(["a.safetensors", "b.pt", "c"]):
        sd = {f"layers.{i}.weight": torch.randn(tensor_bytes // 4) for i in range(count)}
        sd["step"] = torch.tensor(k)
        paths.append(save_as(tmp_path / name, sd))
        del sd
    # (K+1) tensors live at once, plus the reference backend's three float32 temporaries
    # (an unfused K-way sum); the fused backends need none.
    bound = (len(paths) + 1 + 3) * tensor_bytes + (24 << 20)
    assert count * tensor_bytes > 2 * bound
    # One intra-op thread: spinning OpenMP workers on a busy machine make each op take milliseconds.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(M.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "out.safetensors"), *map(str, paths)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in growth.items()}
    print(mib, f"bound {bound / 2**20:.1f} MiB")
    assert growth["streamed"] < bound, f"{mib}, bound {bound / 2**20:.1f} MiB"
    assert growth["in_memory"] > bound, f"the measurement missed an in-memory merge: {mib}"
