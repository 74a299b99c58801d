"""mergekit-style YAML configs: what they mean, what the output looks like, and every bad config.

Outputs of a config are compared bit for bit with the same merge run through the library
functions on each tensor, with each parameter evaluated by hand from mergekit's rules
(gradients over the layers, filters on tensor names); test_merge_methods.py checks the
library functions themselves against float64.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Dict, List, Mapping

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from swm_fused import merge as M

LAYERS = 4


def llm_state_dict(dtype=torch.bfloat16, like: Mapping[str, Tensor] = None, spread: float = 0.1) -> Dict[str, Tensor]:
    """A tiny decoder's names: embeddings, LAYERS layers of attention and MLP weights, a norm and a head."""
    shapes = {"model.embed_tokens.weight": (13, 6)}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (6, 6)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (9, 6)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (6,)
    shapes.update({"model.norm.weight": (6,), "lm_head.weight": (13, 6)})
    if like is None:
        return {k: torch.randn(s).to(dtype) for k, s in shapes.items()}
    return {k: (like[k].double() + spread * torch.randn(s, dtype=torch.float64)).to(dtype) for k, s in shapes.items()}


def save_pretrained_folder(folder: Path, sd: Mapping[str, Tensor], shards: int = 1) -> Path:
    """What save_pretrained writes: model.safetensors, or shards plus model.safetensors.index.json."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if shards == 1:
        save_file(dict(sd), str(folder / "model.safetensors"))
        return folder
    keys = list(sd)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        save_file({k: sd[k] for k in keys if weight_map[k] == name}, str(folder / name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / M.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}))
    return folder


@pytest.fixture
def models(tmp_path):
    base = llm_state_dict()
    sds = {"base": base, "a": llm_state_dict(like=base), "b": llm_state_dict(like=base), "c": llm_state_dict(like=base)}
    paths = {"base": save_pretrained_folder(tmp_path / "base", base, shards=3),
             "a": save_pretrained_folder(tmp_path / "a", sds["a"], shards=2),
             "b": save_pretrained_folder(tmp_path / "b", sds["b"]),
             "c": tmp_path / "c.safetensors"}
    save_file(sds["c"], str(paths["c"]))
    return sds, paths


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(text)
    return path


def read_folder(folder: Path):
    """All tensors of an output folder, the index (or None) and each file's metadata."""
    tensors, metadata = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
            metadata[path.name] = f.metadata()
    index_path = folder / M.SAFETENSORS_INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    return tensors, index, metadata


def position(key: str) -> float:
    """mergekit's place of a tensor through the layers: layer i at i / (L - 1); embeddings 0; the rest 1."""
    if ".layers." in key:
        return int(key.split(".layers.")[1].split(".")[0]) / (LAYERS - 1)
    return 0.0 if "embed" in key else 1.0


def gradient(values: List[float], pos: float) -> float:
    scaled = pos * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def test_ties_config_on_save_pretrained_folders_keeps_the_sharding(tmp_path, models):
    sds, paths = models
    config = write_config(tmp_path, f"""
merge_method: ties
base_model: {paths['base']}
models:
  - model: {paths['base']}          # the base may be listed among the models, as mergekit configs do
  - model: {paths['a']}
    parameters:
      weight: 0.7
      density: [0.2, 0.9]           # a gradient over the layers
  - model: {paths['b']}
    parameters:
      weight:
        - filter: mlp
          value: 0.2
        - value: 0.5
      density: 0.6
parameters:
  normalize: true
  lambda: 0.8
  int8_mask: true                   # accepted, no effect
dtype: float32
""")
    out = tmp_path / "merged"
    M.merge_config(config, out)
    tensors, index, metadata = read_folder(out)
    # The base's three shards and its index, with the same names and assignment.
    base_index = json.loads((paths["base"] / M.SAFETENSORS_INDEX).read_text())
    assert index is not None and index["weight_map"] == base_index["weight_map"]
    assert sorted(metadata) == sorted(set(base_index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for meta in [index["metadata"], *metadata.values()]:
        assert meta["swm_fused.config"] == config.read_text() and meta["swm_fused.method"] == "ties"
    for key, base in sds["base"].items():
        pos = position(key)
        weights = [0.7, 0.2 if "mlp" in key else 0.5]
        density = [gradient([0.2, 0.9], pos), 0.6]
        expected = M.ties({key: base}, [{key: sds["a"][key]}, {key: sds["b"][key]}], weights, density=density,
                          normalize=True, lambda_=0.8, dtype=torch.float32)[key]
        assert tensors[key].dtype == torch.float32
        assert torch.equal(tensors[key], expected), key


def test_slerp_config_with_full_slices_and_filtered_t_gradients(tmp_path, models):
    """The slerp config most mergekit users start from: one slice over every layer, t per filter."""
    sds, paths = models
    config = write_config(tmp_path, f"""
slices:
  - sources:
      - model: {paths['a']}
        layer_range: [0, {LAYERS}]
      - model: {paths['b']}
        layer_range: [0, {LAYERS}]
merge_method: slerp
base_model: {paths['a']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
    out = tmp_path / "slerp.safetensors"
    M.merge_config(config, out)
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["swm_fused.config"] == config.read_text()
    for key, a in sds["a"].items():
        if "self_attn" in key:
            t = gradient([0, 0.5, 0.3, 0.7, 1], position(key))
        elif "mlp" in key:
            t = gradient([1, 0.5, 0.7, 0.3, 0], position(key))
        else:
            t = 0.5
        expected = M.slerp({key: a}, {key: sds["b"][key]}, t)[key]
        assert torch.equal(tensors[key], expected), (key, t)


@pytest.mark.parametrize("method,parameters", [
    ("dare_ties", "density: 0.5\n  rescale: l1"), ("della_linear", "density: 0.5\n  epsilon: 0.2"),
    ("breadcrumbs", "density: 0.8\n  gamma: 0.05"), ("model_stock", "filter_wise: true"),
    ("task_arithmetic", "weight: 0.3\n  lambda: 1.2"), ("linear", "weight: 1.0"), ("dare_linear", "density: 0.4"),
])
def test_each_method_runs_from_a_config_as_from_flags(tmp_path, models, method, parameters):
    sds, paths = models
    base_line = "" if method == "linear" else f"base_model: {paths['base']}\n"
    seed = random.randrange(2**31)
    seed_line = f"\n  seed: {seed}" if method.startswith(("dare", "della")) else ""
    config = write_config(tmp_path, f"""merge_method: {method}
{base_line}models:
  - model: {paths['a']}
  - model: {paths['b']}
  - model: {paths['c']}
parameters:
  {parameters}{seed_line}
""")
    M.merge_config(config, tmp_path / "from_config.safetensors")
    params = {}
    for line in parameters.splitlines():
        name, value = (part.strip() for part in line.split(":"))
        try:
            params[name] = float(value)
        except ValueError:
            params[name] = {"true": True, "false": False}.get(value, value)
    weight = params.pop("weight", None)
    weights = None if weight is None else [weight] * 3
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    if seed_line:
        params["seed"] = seed
    M.merge_files([paths["a"], paths["b"], paths["c"]], tmp_path / "from_flags.safetensors", weights,
                  method=method, base=None if method == "linear" else paths["base"], **params)
    from_config = M.load_state_dict(tmp_path / "from_config.safetensors")
    from_flags = M.load_state_dict(tmp_path / "from_flags.safetensors")
    assert from_config.keys() == from_flags.keys()
    for key in from_config:
        assert torch.equal(from_config[key], from_flags[key]), key


def test_load_config_takes_a_mapping_and_records_the_seed(tmp_path, models):
    sds, paths = models
    config = {"merge_method": "dare_linear", "base_model": str(paths["base"]),
              "models": [{"model": str(paths["a"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    loaded = M.load_config(config)
    assert loaded.method == "dare_linear" and loaded.plan.seed is not None
    out = tmp_path / "out.safetensors"
    M.merge_config(loaded, out)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    again = tmp_path / "again.safetensors"
    M.merge_config(config, again, seed=int(meta["swm_fused.seed"]))
    first, second = M.load_state_dict(out), M.load_state_dict(again)
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------- bad configs: clear error, no output

BAD_CONFIGS = {
    "not_yaml": ("merge_method: ties\nmodels: [a, b\n", "not valid YAML (line 3"),
    "not_mapping": ("- just\n- a list\n", "a YAML mapping"),
    "unknown_key": ("merge_method: linear\nmodels: [{model: A}]\nweights: [1]\n", "unknown key 'weights'"),
    "no_method": ("models: [{model: A}]\n", "merge_method is missing"),
    "unknown_method": ("merge_method: ties_magic\nmodels: [{model: A}]\n", "unknown method 'ties_magic'"),
    "unknown_parameter": ("merge_method: ties\nbase_model: BASE\nmodels:\n  - model: A\n    parameters: "
                          "{densty: 0.5}\n", "unknown parameter 'densty' for method 'ties'"),
    "global_in_model": ("merge_method: ties\nbase_model: BASE\nmodels:\n  - model: A\n    parameters: "
                        "{normalize: true}\n", "applies to the whole merge"),
    "density_zero": ("merge_method: dare_ties\nbase_model: BASE\nmodels:\n  - model: A\n    parameters: "
                     "{density: 0}\n", "density of model 0 must be in (0, 1]"),
    "density_gradient": ("merge_method: ties\nbase_model: BASE\nmodels:\n  - model: A\n    parameters: "
                         "{density: [0.5, 1.5]}\n", "density of model 0 must be in (0, 1], got 1.5"),
    "t_out_of_range": ("merge_method: slerp\nbase_model: A\nmodels: [{model: A}, {model: B}]\nparameters: {t: 1.5}\n",
                       "t must be in [0, 1], got 1.5"),
    "slerp_three": ("merge_method: slerp\nmodels: [{model: A}, {model: B}, {model: BASE}]\nparameters: {t: 0.5}\n",
                    "exactly two models, got 3"),
    "slerp_without_t": ("merge_method: slerp\nmodels: [{model: A}, {model: B}]\n", "requires t"),
    "missing_base": ("merge_method: ties\nmodels: [{model: A}, {model: B}]\n", "needs a base model"),
    "stock_one_model": ("merge_method: model_stock\nbase_model: BASE\nmodels: [{model: A}]\n", "at least 2 models"),
    "base_for_linear": ("merge_method: linear\nbase_model: BASE\nmodels: [{model: A}]\n", "does not use a base"),
    "gamma_too_big": ("merge_method: breadcrumbs\nbase_model: BASE\nmodels: [{model: A}]\nparameters: "
                      "{density: 0.9, gamma: 0.2}\n", "density + gamma must be at most 1"),
    "epsilon_too_big": ("merge_method: della\nbase_model: BASE\nmodels: [{model: A}]\nparameters: "
                        "{density: 0.3, epsilon: 0.3}\n", "density +- epsilon must lie in (0, 1]"),
    "bad_sign": ("merge_method: ties\nbase_model: BASE\nmodels: [{model: A}]\nparameters: {majority_sign: vote}\n",
                 "majority_sign must be one of sum, count"),
    "bad_dtype": ("merge_method: linear\nmodels: [{model: A}]\ndtype: int8\n", "dtype: unknown dtype 'int8'"),
    "slices_partial": ("merge_method: slerp\nslices:\n  - sources:\n      - model: A\n        layer_range: [0, 2]\n"
                       "      - model: B\n        layer_range: [0, 2]\nparameters: {t: 0.5}\n",
                       f"layer_range must be [0, {LAYERS}], got [0, 2]"),
    "slices_stacked": ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}]\n"
                       "  - sources: [{model: B, layer_range: [2, 4]}]\n", "unknown method 'passthrough'"),
    "two_slices": ("merge_method: linear\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}]\n"
                   "  - sources: [{model: B, layer_range: [2, 4]}]\n", "only one slice"),
    "tokenizer": ("merge_method: linear\nmodels: [{model: A}]\ntokenizer_source: union\n", "builds no tokenizer"),
    "models_and_slices": ("merge_method: linear\nmodels: [{model: A}]\nslices: []\n", "exactly one of models"),
    "lora": ("merge_method: linear\nmodels: [{model: {model: {path: A}, lora: x}}]\n", "only local paths"),
    "shape_mismatch": ("merge_method: ties\nbase_model: BASE\nmodels: [{model: A}, {model: ODD}]\n",
                       "shape mismatch for tensor 'lm_head.weight'"),
    "missing_model": ("merge_method: ties\nbase_model: BASE\nmodels: [{model: A}, {model: org/model-7b}]\n",
                      "org/model-7b: no such file or folder"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_configs_raise_one_clear_error_and_write_nothing(tmp_path, models, name, monkeypatch):
    sds, paths = models
    odd = dict(sds["a"], **{"lm_head.weight": torch.randn(14, 6).bfloat16()})
    save_file(odd, str(tmp_path / "odd.safetensors"))
    text, message = BAD_CONFIGS[name]
    for placeholder, path in (("BASE", paths["base"]), ("ODD", tmp_path / "odd.safetensors"), ("A", paths["a"]),
                              ("B", paths["b"])):
        text = text.replace(f"model: {placeholder}", f"model: {path}").replace(f"base_model: {placeholder}",
                                                                            f"base_model: {path}")
    config = write_config(tmp_path, text)
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    for out in (tmp_path / "out.safetensors", tmp_path / "out_folder"):
        error = FileNotFoundError if name == "missing_model" else ValueError
        with pytest.raises(error) as info:
            M.merge_config(config, out)
        assert message in str(info.value), str(info.value)
        assert sorted(os.listdir(tmp_path)) == before
    if name not in ("shape_mismatch", "missing_model"):
        assert isinstance(info.value, M.MergeConfigError if name != "slices_partial" else M.MergeParameterError)


def test_output_folder_must_be_new_or_empty(tmp_path, models):
    sds, paths = models
    config = write_config(tmp_path, f"merge_method: linear\nmodels: [{{model: {paths['a']}}}, {{model: {paths['b']}}}]\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        M.merge_config(config, full)
    assert os.listdir(full) == ["keep.txt"]
    with pytest.raises(ValueError, match="would overwrite the input"):
        M.merge_config(config, paths["a"])
    empty = tmp_path / "empty"
    empty.mkdir()
    M.merge_config(config, empty)  # an empty folder is filled, in the reference input's (a's) layout: 2 shards
    assert sorted(os.listdir(empty)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                         M.SAFETENSORS_INDEX]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
