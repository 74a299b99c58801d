"""The merge methods against plain float64 implementations of their formulas (docs/merge_methods.md).

Every method runs on fresh random state dicts with odd shapes (a scalar, an empty tensor, a
non-contiguous view, a 4097-long vector, a 3-d tensor) in fp32, bf16 and fp16 (and fp64), and
each floating output is compared with the formula computed here in float64, within the error of
float32 arithmetic plus one rounding into the output dtype.

Two things are not arithmetic and are taken as given by the contract: which entries a
magnitude selection keeps is decided on the task vectors as the compute dtype holds them
(``fl32(theta - base)``, or float64 for float64 inputs), and DARE's and DELLA's uniform draws are
:func:`swm_fused.merge.kernels.uniform` (seeded per merge seed, tensor and model). Where the
elected TIES sign of an entry is within rounding of 0, either sign is accepted for that entry.
"""
from __future__ import annotations

import math
import os
import random
import sys
from typing import Dict, Mapping, Optional, Sequence

import pytest
import torch
from torch import Tensor

import swm_fused
from swm_fused import merge as M
from swm_fused.merge import kernels

FP32_EPS = torch.finfo(torch.float32).eps
FP64_EPS = torch.finfo(torch.float64).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = {"model.layers.0.fc.weight": (7, 3), "model.layers.1.fc.bias": (4097,), "scale": (),
          "empty": (0, 5), "model.layers.2.conv.weight": (2, 3, 4), "model.embed_tokens.weight": (11, 6)}
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                       "della", "della_linear")
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
NORMALIZE_DEFAULT = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False,
                     "breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": False}


# --------------------------------------------------------------------------- data

def random_state_dict(dtype: torch.dtype, base: Optional[Mapping[str, Tensor]] = None, spread: float = 1.0,
                      scale: float = 1.0) -> Dict[str, Tensor]:
    """Odd shapes, a non-contiguous view, an int buffer; near ``base`` (a fine-tune of it) when given."""
    sd = {}
    for key, shape in SHAPES.items():
        noise = torch.randn(shape, dtype=torch.float64) * spread * scale
        sd[key] = (noise + base[key].double() if base is not None else noise).to(dtype)
    t = torch.randn(6, 5, dtype=torch.float64) * spread * scale
    sd["transposed"] = (t.t() + base["transposed"].double() if base is not None else t.t()).to(dtype)
    assert not sd["transposed"].is_contiguous()
    sd["bn.num_batches_tracked"] = torch.randint(0, 1000, ())
    return sd


def make_models(dtype: torch.dtype, count: int, scale: float = 1.0):
    base = random_state_dict(dtype, scale=scale)
    return base, [random_state_dict(dtype, base, spread=random.uniform(0.05, 0.5), scale=scale) for _ in range(count)]


# --------------------------------------------------------------------------- float64 formulas

def keys_of(delta64: Tensor, dtype: torch.dtype) -> Tensor:
    """|delta| as the compute dtype holds it: what magnitude selections rank (see the module docstring)."""
    return (delta64 if dtype == torch.float64 else delta64.float().double()).abs()


def count_of(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))


def ref_trim(delta: Tensor, keys: Tensor, density: float) -> Tensor:
    """TIES: keep the entries at least as large as the k-th largest |delta|, k = round(density * n)."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = min(max(count_of(density, n), 1), n)
    threshold = keys.flatten().sort(descending=True).values[k - 1]
    return torch.where(keys >= threshold, delta, 0.0)


def ref_breadcrumbs(delta: Tensor, keys: Tensor, density: float, gamma: float) -> Tensor:
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    n_top = min(count_of(gamma, n), n - 1)
    k = min(max(count_of(density, n), 1), n - n_top)
    ordered = keys.flatten().sort(descending=True).values
    hi = ordered[n_top - 1] if n_top > 0 else math.inf
    lo = ordered[n_top + k - 1]
    return torch.where((keys >= lo) & (keys < hi), delta, 0.0)


def ref_rescaled(delta: Tensor, keep: Tensor, p, rescale: str) -> Tensor:
    kept = torch.where(keep, delta, 0.0)
    if rescale == "density":
        return kept / p
    if rescale == "l1":
        after = kept.abs().sum()
        return kept * (delta.abs().sum() / after) if after > 0 else kept
    return kept


def ref_dare(delta: Tensor, u: Tensor, density: float, rescale: str) -> Tensor:
    if density >= 1 or delta.numel() == 0:
        return delta
    return ref_rescaled(delta, u.double() < density, density, rescale)


def ref_della(delta: Tensor, keys: Tensor, u: Tensor, density: float, epsilon: float, rescale: str) -> Tensor:
    """Ranks per row (rows = first dim), increasing |delta|, ties in index order; p spans density +- epsilon."""
    if density >= 1 or delta.numel() == 0:
        return delta
    rows = keys.reshape(keys.shape[0], -1) if keys.dim() >= 2 else keys.reshape(1, -1)
    n = rows.shape[1]
    if n == 1:
        p = torch.full(delta.shape, density, dtype=torch.float64)
    else:
        ranks = torch.empty(rows.shape, dtype=torch.float64)
        for r in range(rows.shape[0]):
            order = sorted(range(n), key=lambda j: (rows[r, j].item(), j))
            for rank, j in enumerate(order):
                ranks[r, j] = rank
        p = ((density - epsilon) + 2 * epsilon * ranks / (n - 1)).reshape(delta.shape)
    return ref_rescaled(delta, u.double() < p, p, rescale)


def ref_sparsified(method: str, key: str, i: int, base: Tensor, theta: Tensor, params: Mapping, seed: Optional[int],
                   compute: torch.dtype, device: torch.device = torch.device("cpu")) -> Tensor:
    delta = theta.double() - base.double()
    keys = keys_of(delta, compute)
    density = params.get("density", 1.0)
    if method in ("ties",):
        return ref_trim(delta, keys, density)
    if method.startswith("breadcrumbs"):
        return ref_breadcrumbs(delta, keys, density, params.get("gamma", 0.01))
    if method.startswith("dare") or method.startswith("della"):
        u = kernels.uniform(seed, key, i, delta.shape, device).cpu()  # the draws of the device that merged
        rescale = params.get("rescale", "density")
        if method.startswith("dare"):
            return ref_dare(delta, u, density, rescale)
        return ref_della(delta, keys, u, density, params.get("epsilon", 0.15), rescale)
    return delta


def ref_task_vector_merge(method: str, key: str, base: Tensor, thetas: Sequence[Tensor], weights: Sequence[float],
                          params: Mapping, seed: Optional[int], compute: torch.dtype,
                          device: torch.device = torch.device("cpu")):
    """(expected, expected with the other sign where the election is ambiguous, ambiguous mask, error scale)."""
    deltas = [ref_sparsified(method, key, i, base, t, per_model(params, i), seed, compute, device)
              for i, t in enumerate(thetas)]
    x = [w * d for w, d in zip(weights, deltas)]
    magnitude = sum(v.abs() for v in x)
    normalize = params.get("normalize", NORMALIZE_DEFAULT[method])
    lam = params.get("lambda", 1.0)
    b = base.double()
    if method not in CONSENSUS:
        divisor = math.fsum(weights) if normalize else 1.0
        exact = b + lam * sum(x) / divisor
        return exact, exact, torch.zeros(b.shape, dtype=torch.bool), b.abs() + abs(lam) * magnitude / abs(divisor)

    def mix(positive: Tensor) -> Tensor:
        kept = [torch.where(positive, v > 0, v < 0) for v in x]
        total = sum(torch.where(k, v, 0.0) for k, v in zip(kept, x))
        divisor = sum(k.double() * w for k, w in zip(kept, weights))
        if normalize:
            total = total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        return b + lam * total

    majority = params.get("majority_sign", "sum")
    election = sum(x) if majority == "sum" else sum(torch.sign(v) for v in x)
    ambiguous = (election.abs() <= 64 * (len(x) + 2) * FP32_EPS * magnitude) & (magnitude > 0) \
        if majority == "sum" else torch.zeros(b.shape, dtype=torch.bool)
    scale = b.abs() + abs(lam) * magnitude
    if normalize:
        scale = b.abs() + abs(lam) * magnitude / min(abs(w) for w in weights)
    return mix(election >= 0), mix(election < 0), ambiguous, scale


def assert_matches(got: Tensor, exact: Tensor, other: Tensor, ambiguous: Tensor, scale: Tensor,
                   out_dtype: torch.dtype, compute: torch.dtype, what: str, terms: int = 8) -> None:
    """|got - exact| <= one rounding into out_dtype + compute-dtype arithmetic on ``scale``; ``other`` where ambiguous."""
    assert got.dtype == out_dtype, f"{what}: {got.dtype} != {out_dtype}"
    assert got.shape == exact.shape, what
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output"
    finfo = torch.finfo(out_dtype)
    ceps = FP64_EPS if compute == torch.float64 else FP32_EPS
    bound = finfo.eps * exact.abs() + 4 * (terms + 4) * ceps * scale + finfo.smallest_normal * finfo.eps
    err = (got.double() - exact).abs()
    err = torch.where(ambiguous, torch.minimum(err, (got.double() - other).abs()), err)
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())}/{bad.numel()} entries off; max error "
                                 f"{err.max().item():.3g}, bound at worst {bound.flatten()[int((err - bound).argmax())]:.3g}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def random_params(method: str, count: int) -> Dict:
    params: Dict = {}
    if method != "task_arithmetic":
        params["density"] = [round(random.uniform(0.2, 0.9), 3) for _ in range(count)]
    if method.startswith("breadcrumbs"):
        params["gamma"] = round(random.uniform(0.0, 0.1), 3)
    if method.startswith("della"):
        params["epsilon"] = round(0.9 * min(min(params["density"]), 1 - max(params["density"])), 3)
    if method.startswith("dare") or method.startswith("della"):
        params["rescale"] = random.choice(["density", "l1", "none"])
    if method in CONSENSUS:
        params["majority_sign"] = random.choice(["sum", "count"])
    params["lambda"] = round(random.uniform(0.5, 1.5), 3)
    params["normalize"] = random.choice([True, False])
    return params


def per_model(params: Mapping, i: int) -> Dict:
    return {k: (v[i] if isinstance(v, list) else v) for k, v in params.items()}


# --------------------------------------------------------------------------- the task-vector methods

def run_method(method: str, base, models, weights, params, seed, dtype=None, device=None):
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
    if method.startswith("dare") or method.startswith("della"):
        kwargs["seed"] = seed
    return M.merge_models(method, models, base, weights, dtype=dtype, device=device, **kwargs)


def check_method(method, base, models, weights, params, seed, result, out_dtype=None, device=torch.device("cpu")):
    for key, template in base.items():
        got = result[key]
        if not template.is_floating_point():
            assert torch.equal(got, template), key
            continue
        dtype = out_dtype or template.dtype
        compute = compute_dtype(template.dtype, *(m[key].dtype for m in models), dtype)
        thetas = [m[key] for m in models]
        exact, other, ambiguous, scale = ref_task_vector_merge(method, key, template, thetas, weights, params, seed,
                                                               compute, device)
        assert_matches(got, exact, other, ambiguous, scale, dtype, compute, f"{method} {key}", terms=len(models) + 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_task_vector_methods_match_float64(method, dtype):
    count = random.choice([1, 2, 3, 5])
    base, models = make_models(dtype, count)
    weights = [round(random.uniform(0.3, 1.5), 3) for _ in range(count)]
    params = random_params(method, count)
    seed = random.randrange(2**31)
    result = run_method(method, base, models, weights, params, seed)
    check_method(method, base, models, weights, params, seed, result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_task_vector_methods_on_cuda_match_float64(method, dtype):
    """The arithmetic runs on the GPU (device="cuda"); results come back to the inputs' device."""
    count = 3
    base, models = make_models(dtype, count)
    weights = [round(random.uniform(0.3, 1.5), 3) for _ in range(count)]
    params = random_params(method, count)
    seed = random.randrange(2**31)
    result = run_method(method, base, models, weights, params, seed, device="cuda")
    assert all(t.device.type == "cpu" for t in result.values())
    check_method(method, base, models, weights, params, seed, result, device=torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_stock_and_slerp_on_cuda_match_cpu():
    base, models = make_models(torch.bfloat16, 3)
    for filter_wise in (False, True):
        gpu = M.merge_models("model_stock", models, base, device="cuda", filter_wise=filter_wise)
        cpu = M.model_stock(base, models, filter_wise=filter_wise)
        for key in cpu:
            torch.testing.assert_close(gpu[key], cpu[key], rtol=2 ** -7, atol=1e-6)
    gpu = M.merge_models("slerp", models[:1], base, device="cuda", t=0.3)
    cpu = M.slerp(base, models[0], 0.3)
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della_linear", "breadcrumbs_ties"])
def test_mixed_sign_weights_fp64_inputs_and_output_dtypes(method):
    base, models = make_models(torch.float64, 3)
    models[1] = {k: (v.float() if v.is_floating_point() else v) for k, v in models[1].items()}  # mixed input dtypes
    weights = [1.2, -0.4, 0.7]
    params = random_params(method, 3)
    params["normalize"] = False  # mixed-sign weights may cancel in a normalizing sum
    seed = random.randrange(2**31)
    result = run_method(method, base, models, weights, params, seed)
    check_method(method, base, models, weights, params, seed, result)  # fp64 base: computed in fp64
    for out_dtype in (torch.bfloat16, torch.float32):
        result = run_method(method, base, models, weights, params, seed, dtype=out_dtype)
        check_method(method, base, models, weights, params, seed, result, out_dtype=out_dtype)


def test_defaults_follow_the_documented_table():
    base, models = make_models(torch.float32, 2)
    for method in TASK_VECTOR_METHODS:
        params = {} if method == "task_arithmetic" else {"density": 0.5}
        weights = [0.6, 0.9]
        seed = 7
        result = run_method(method, base, models, weights, params, seed)
        # No normalize, rescale, gamma, epsilon, lambda given: the reference uses the documented defaults.
        check_method(method, base, models, weights, params, seed, result)


def test_weights_default_to_one_for_task_vector_methods():
    base, models = make_models(torch.float32, 2)
    result = M.ties(base, models, density=0.6)
    check_method("ties", base, models, [1.0, 1.0], {"density": 0.6}, None, result)
    result = M.breadcrumbs(base, models, density=0.6, gamma=0.05)
    check_method("breadcrumbs", base, models, [1.0, 1.0], {"density": 0.6, "gamma": 0.05}, None, result)


def test_named_functions_equal_merge_models():
    base, models = make_models(torch.bfloat16, 3)
    weights = [0.5, 1.0, 0.25]
    cases = {
        "ties": (M.ties, dict(density=0.4, majority_sign="count")),
        "dare_linear": (M.dare_linear, dict(density=0.3, rescale="l1", seed=3)),
        "dare_ties": (M.dare_ties, dict(density=0.3, seed=4)),
        "breadcrumbs": (M.breadcrumbs, dict(density=0.5, gamma=0.1)),
        "breadcrumbs_ties": (M.breadcrumbs_ties, dict(density=0.5, gamma=0.1, normalize=True)),
        "della": (M.della, dict(density=0.5, epsilon=0.2, seed=5)),
        "della_linear": (M.della_linear, dict(density=0.5, epsilon=0.2, seed=6, lambda_=0.8)),
    }
    for method, (fn, kwargs) in cases.items():
        named = fn(base, models, weights, **kwargs)
        generic = M.merge_models(method, models, base, weights, **kwargs)
        for key in named:
            assert torch.equal(named[key], generic[key]), (method, key)


def test_ties_keeps_the_top_density_and_the_agreeing_signs_by_hand():
    """A case small enough to check by eye: trim, elect, disjoint mean."""
    base = {"w": torch.zeros(5)}
    a = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])}
    b = {"w": torch.tensor([-1.0, 2.0, -3.0, 1.0, 5.0])}
    out = M.ties(base, [a, b], density=0.6)["w"]
    # a keeps 3, 2, -4 (top 3 of 5); b keeps 2, -3, 5. Elected: +, +, -, +, +.
    assert torch.equal(out, torch.tensor([3.0, 2.0, -3.0, 2.0, 5.0]))
    count = M.ties(base, [a, b], density=1.0, majority_sign="count", normalize=False)["w"]
    # Signs: (+,-) tie -> +; (-,+) -> +; (+,-) -> +; (+,+); (-,+) -> +.
    assert torch.equal(count, torch.tensor([3.0, 2.0, 0.5, 3.0, 5.0]))


def test_ties_threshold_is_a_selection_not_a_sort(monkeypatch):
    base, models = make_models(torch.float32, 2)

    def no_sort(*args, **kwargs):
        raise AssertionError("a full sort was used")

    monkeypatch.setattr(torch, "sort", no_sort)
    monkeypatch.setattr(torch, "argsort", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    M.ties(base, models, density=0.3)
    M.breadcrumbs_ties(base, models, density=0.3, gamma=0.1)


# --------------------------------------------------------------------------- randomness

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_seeded_draws_are_reproducible(method):
    base, models = make_models(torch.bfloat16, 3)
    params = {"density": 0.4, "epsilon": 0.2} if method.startswith("della") else {"density": 0.4}
    first = M.merge_models(method, models, base, seed=11, **params)
    again = M.merge_models(method, models, base, seed=11, **params)
    other = M.merge_models(method, models, base, seed=12, **params)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["model.layers.1.fc.bias"], other["model.layers.1.fc.bias"])
    torch.manual_seed(3)
    unseeded = M.merge_models(method, models, base, **params)
    torch.manual_seed(3)
    assert torch.equal(M.merge_models(method, models, base, **params)["model.layers.1.fc.bias"],
                       unseeded["model.layers.1.fc.bias"])  # seed=None draws its seed from torch's generator


def test_dare_keeps_about_density_and_rescale_keeps_the_mean():
    base = {"w": torch.zeros(200_000)}
    model = {"w": torch.ones(200_000)}
    out = M.dare_linear(base, [model], density=0.3, seed=1)["w"]
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.005
    assert torch.allclose(out[kept], torch.full((int(kept.sum()),), 1 / 0.3))  # rescale="density": 1/p
    l1 = M.dare_linear(base, [model], density=0.3, seed=1, rescale="l1")["w"]
    assert torch.equal(l1 != 0, kept)  # same draws, other scale
    assert abs(l1.double().sum().item() - 200_000) < 1  # the L1 norm is kept exactly


def test_della_probabilities_rise_with_magnitude():
    base = {"w": torch.zeros(1, 100_000)}
    model = {"w": torch.linspace(0.01, 1, 100_000).reshape(1, -1)}
    out = M.della_linear(base, [model], density=0.5, epsilon=0.4, seed=2, rescale="none")["w"].reshape(-1)
    small, large = (out[:20_000] != 0).double().mean().item(), (out[-20_000:] != 0).double().mean().item()
    assert abs(small - 0.18) < 0.02 and abs(large - 0.82) < 0.02  # 0.1 + 0.8 r, averaged over each fifth


# --------------------------------------------------------------------------- fp16 overflow (mergekit issue 609)

@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "della", "breadcrumbs_ties"])
def test_fp16_large_deltas_stay_finite_and_exact(method):
    """Deltas near 80000 overflow fp16 (max 65504) and their L1 norms overflow it many times over."""
    count = 3
    sign = torch.where(torch.rand(4097) > 0.5, 1.0, -1.0).double()
    base = {"w": (-40000 * sign + torch.randn(4097, dtype=torch.float64) * 100).half()}
    models = [{"w": (40000 * sign + torch.randn(4097, dtype=torch.float64) * 2000).half()} for _ in range(count)]
    assert bool(torch.isinf(models[0]["w"] - base["w"]).any())  # fp16 arithmetic would overflow
    weights = [1.0] * count
    params = {"density": 0.5, "normalize": True}
    if method.startswith("dare") or method.startswith("della"):
        params["rescale"] = "l1"
    if method.startswith("della"):
        params["epsilon"] = 0.2
    if method.startswith("dare") or method.startswith("della"):
        params["lambda"] = 0.5  # the kept deltas are rescaled by about 1 / density = 2: keep the result in range
    seed = 5
    result = run_method(method, base, models, weights, params, seed)
    assert bool(torch.isfinite(result["w"]).all())
    check_method(method, base, models, weights, params, seed, result)


def test_bf16_count_election_with_many_models():
    """mergekit issue 231: sign counts in bf16 lose integers above 256; counts here are exact."""
    base = {"w": torch.zeros(17, dtype=torch.bfloat16)}
    signs = [1.0] * 151 + [-1.0] * 149
    models = [{"w": torch.full((17,), s, dtype=torch.bfloat16) * (1 + 0.01 * i)} for i, s in enumerate(signs)]
    out = M.ties(base, models, majority_sign="count", normalize=False)["w"]
    expected = math.fsum(m["w"][0].item() for m, s in zip(models, signs) if s > 0)  # the + side wins, 151 to 149
    assert torch.equal(out, torch.full((17,), expected).to(torch.bfloat16))


# --------------------------------------------------------------------------- model stock

def ref_model_stock(base: Tensor, thetas: Sequence[Tensor], filter_wise: bool):
    b = base.double()
    rows = b.shape[0] if (filter_wise and b.dim() >= 2) else 1
    cols = b.numel() // rows if rows else 0
    deltas = [(t.double() - b).reshape(rows, cols) for t in thetas]
    n = len(thetas)
    t_rows = []
    for r in range(rows):
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                di, dj = deltas[i][r], deltas[j][r]
                norm = di.norm() * dj.norm()
                cosines.append(float((di @ dj) / norm) if norm > 0 else 0.0)
        c = max(0.0, sum(max(-1.0, min(1.0, x)) for x in cosines) / len(cosines))  # negative c: t = 0
        t_rows.append(n * c / (1 + (n - 1) * c))
    t = torch.tensor(t_rows, dtype=torch.float64).reshape(rows, *([1] * max(b.dim() - 1, 0))) if filter_wise and \
        b.dim() >= 2 else torch.tensor(t_rows[0], dtype=torch.float64)
    mean = sum(x.double() for x in thetas) / n
    return t * mean + (1 - t) * b, (mean - b).abs(), b.abs() + mean.abs()


@pytest.mark.parametrize("filter_wise", [False, True], ids=["per-tensor", "filter-wise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_stock_matches_float64(dtype, filter_wise):
    count = random.choice([2, 3, 4])
    base = random_state_dict(dtype)
    shared = random_state_dict(torch.float64, scale=0.3)  # the fine-tunes share a direction: c near 0.5
    models = [{k: (base[k].double() + shared[k].double() + 0.3 * torch.randn(base[k].shape, dtype=torch.float64)
                   ).to(dtype) if base[k].is_floating_point() else base[k] for k in base} for _ in range(count)]
    result = M.model_stock(base, models, filter_wise=filter_wise)
    for key, template in base.items():
        if not template.is_floating_point():
            assert torch.equal(result[key], template)
            continue
        exact, spread, scale = ref_model_stock(template, [m[key] for m in models], filter_wise)
        # t comes from float32 reductions: allow a 2e-5 error in t on top of the arithmetic
        assert_matches(result[key], exact, exact, torch.zeros(exact.shape, dtype=torch.bool),
                       scale + 2e-5 / (4 * (count + 8) * FP32_EPS) * spread, dtype, torch.float32,
                       f"model_stock {key}", terms=count + 4)


def test_model_stock_degenerate_cases():
    base = {"w": torch.randn(10)}
    same = [dict(base), dict(base)]
    assert torch.equal(M.model_stock(base, same)["w"], base["w"])  # zero deltas: cosines 0, t = 0
    d = torch.randn(10)
    opposite = [{"w": base["w"] + d}, {"w": base["w"] - d}]  # c = -1: 1 + (N-1)c = 0; c < 0 gives t = 0
    assert torch.equal(M.model_stock(base, opposite)["w"], base["w"])
    apart = [{"w": base["w"] + d}, {"w": base["w"] - d + 0.3 * torch.randn(10)}, {"w": base["w"] + torch.randn(10)}]
    assert torch.equal(M.model_stock(base, apart[:2])["w"], base["w"])
    parallel = [{"w": base["w"] + d}, {"w": base["w"] + 2 * d}]  # c = 1: t = 1, the plain mean
    assert torch.allclose(M.model_stock(base, parallel)["w"], base["w"] + 1.5 * d, atol=1e-6)


# --------------------------------------------------------------------------- slerp

def ref_slerp(a: Tensor, b: Tensor, t: float):
    x, y = a.double().flatten(), b.double().flatten()
    nx, ny = x.norm(), y.norm()
    cos = float((x @ y) / (nx * ny)) if nx > 0 and ny > 0 else None
    if cos is None or abs(cos) > 0.9995:
        s0, s1 = 1 - t, t
    else:
        omega = math.acos(max(-1.0, min(1.0, cos)))
        s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (s0 * a.double() + s1 * b.double()), abs(s0) * a.double().abs() + abs(s1) * b.double().abs(), \
        a.double().abs() + b.double().abs()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slerp_matches_float64(dtype):
    a, b = random_state_dict(dtype), random_state_dict(dtype)
    near = {k: ((v.double() + 1e-3 * torch.randn(v.shape, dtype=torch.float64)).to(dtype)
                if v.is_floating_point() else v) for k, v in a.items()}  # |cos| > 0.9995: lerp
    t = random.uniform(0, 1)
    for other in (b, near):
        result = M.slerp(a, other, t)
        for key, template in a.items():
            if not template.is_floating_point():
                assert torch.equal(result[key], template)
                continue
            exact, scale, spread = ref_slerp(template, other[key], t)
            assert_matches(result[key], exact, exact, torch.zeros(exact.shape, dtype=torch.bool),
                           scale + 1e-5 / (32 * FP32_EPS) * spread, dtype, torch.float32, f"slerp {key}", terms=4)


def test_slerp_is_spherical_and_ends_exact():
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 1.0])}
    mid = M.slerp(a, b, 0.5)["w"]
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5)] * 2))  # lerp would give 0.5, 0.5
    assert torch.equal(M.slerp(a, b, 0.0)["w"], a["w"]) and torch.equal(M.slerp(a, b, 1.0)["w"], b["w"])


def test_slerp_t_gradient_over_layers():
    """t = [0, 0.8, 0.2] over 5 layers: mergekit's interpolation; embeddings at 0, norms and heads at 1."""
    keys = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.weight" for i in range(5)] + \
        ["model.norm.weight", "lm_head.weight"]
    a = {k: torch.randn(8, 3) for k in keys}
    b = {k: torch.randn(8, 3) for k in keys}
    result = M.slerp(a, b, [0.0, 0.8, 0.2])
    expected_t = {"model.embed_tokens.weight": 0.0, "model.layers.0.mlp.weight": 0.0,
                  "model.layers.1.mlp.weight": 0.4, "model.layers.2.mlp.weight": 0.8,
                  "model.layers.3.mlp.weight": 0.5, "model.layers.4.mlp.weight": 0.2,
                  "model.norm.weight": 0.2, "lm_head.weight": 0.2}
    for key, t in expected_t.items():
        exact, scale, _ = ref_slerp(a[key], b[key], t)
        assert_matches(result[key], exact, exact, torch.zeros(exact.shape, dtype=torch.bool), scale + 1e-3,
                       torch.float32, torch.float32, key)


# --------------------------------------------------------------------------- kernels' contracts

def test_kernels_contracts():
    delta = torch.randn(1000, dtype=torch.float64)
    u = kernels.uniform(1, "k", 0, (1000,), torch.device("cpu"))
    assert u.dtype == torch.float32 and torch.equal(u, kernels.uniform(1, "k", 0, (1000,), torch.device("cpu")))
    assert not torch.equal(u, kernels.uniform(1, "k", 1, (1000,), torch.device("cpu")))
    out = kernels.drop_and_rescale_(delta.clone(), u, 0.25, "density")
    assert torch.equal(out, torch.where(u.double() < 0.25, delta / 0.25, 0.0))
    p = torch.rand(1000, dtype=torch.float64) * 0.5 + 0.25
    out = kernels.drop_and_rescale_(delta.clone(), u, p, "density")
    assert torch.equal(out, torch.where(u.double() < p, delta / p, 0.0))
    out = kernels.drop_and_rescale_(delta.float(), u, p, "l1")
    kept = torch.where(u.double() < p, delta, 0.0)
    assert torch.allclose(out.double(), kept * delta.abs().sum() / kept.abs().sum(), rtol=1e-5, atol=0)
    x = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-2.0, 1.0, 0.0, -1.0])]
    mixed = torch.empty(4)
    swm_fused.ties_merge_(mixed, x, [1.0, 1.0], majority_sign="sum")  # M of the sign election, no base
    assert torch.equal(mixed, torch.tensor([-2.0, -2.0, 0.0, 3.0]))
    swm_fused.ties_merge_(mixed, x, [2.0, 3.0], majority_sign="sum", normalize=True)  # M / D, D = 0 read as 1
    assert torch.equal(mixed, torch.tensor([-6.0 / 3.0, -4.0 / 2.0, 0.0, 6.0 / 2.0]))
    swm_fused.ties_merge_(mixed, x, [1.0, 1.0], majority_sign="count")
    assert torch.equal(mixed, torch.tensor([1.0, 1.0, 0.0, 3.0]))  # ties in the count elect +


# --------------------------------------------------------------------------- streaming memory bound

METHOD_MEMORY_SCRIPT = """
import json, sys
import swm_fused
from swm_fused import merge as M

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def peak_growth(fn):
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set (VmHWM) to the current one
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

method, params, out, base, *paths = sys.argv[1:]
params = json.loads(params)
base = None if base == "-" else base
M.merge_files(paths[:1], out, progress=False)  # warm up imports and lazy initialisation
if method == "in-memory":
    growth = peak_growth(lambda: M.merge_models("ties", [M.load_state_dict(p) for p in paths],
                                                M.load_state_dict(base), density=0.5))
else:
    growth = peak_growth(lambda: M.merge_files(paths, out, method=method, base=base, progress=False, **params))
print(json.dumps(growth))
"""

# Float32 temporaries of the largest tensor's size each method may hold on top of its K+1 tensors
# (int64 and float64 ones count twice); docs/merge_methods.md lists the same numbers.
TEMPORARIES = {"ties": 6, "breadcrumbs_ties": 6, "dare_ties": 6, "dare_linear": 6, "della": 12, "della_linear": 12,
               "model_stock": 6, "slerp": 3, "task_arithmetic": 3}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_every_method_streams_with_bounded_memory(tmp_path):
    """Peak RSS growth of each streamed method stays under (K+1+F) x the largest tensor + a constant.

    As in test_merge.py's linear test: a fresh process per method, the kernel's exact high-water
    mark after resetting it, and an in-memory merge of the same files that must exceed the bound
    (which shows the measurement can fail). glibc is told to map large blocks directly
    (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and the peak is
    the live memory of the merge rather than the allocator's cache.
    """
    import subprocess
    import json as json_module
    from pathlib import Path as P
    from test_merge import save_as

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS through /proc/self/clear_refs")
    tensor_bytes, count = 2 << 20, 16  # 16 tensors of 2 MiB: 32 MiB per checkpoint
    paths = []
    for k, name in enumerate(["base.safetensors", "a.pt", "b"]):
        sd = {f"model.layers.{i}.weight": torch.randn(tensor_bytes // 4) for i in range(count)}
        sd["step"] = torch.tensor(k)
        paths.append(save_as(tmp_path / name, sd))
        del sd
    base, models = paths[0], paths[1:]
    # One method per code path (breadcrumbs shares ties' selection, the _linear variants their sparsifier's).
    params = {"ties": {"density": 0.3}, "dare_ties": {"density": 0.3, "seed": 1, "rescale": "l1"},
              "della": {"density": 0.3, "epsilon": 0.1, "seed": 1}, "model_stock": {"filter_wise": True},
              "slerp": {"t": 0.3}, "task_arithmetic": {"weights": [0.5, 0.5]}, "in-memory": {}}
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(P(M.__file__).parents[2]), str(P(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")]))
    procs = {}
    for method, p in params.items():
        ins = [str(models[0]), str(models[1])]
        command = [sys.executable, "-c", METHOD_MEMORY_SCRIPT, method, json_module.dumps(p),
                   str(tmp_path / f"out_{method}.safetensors"), "-" if method == "slerp" else str(base), *ins]
        procs[method] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    growth = {}
    for method, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{method}: {stderr}"
        growth[method] = json_module.loads(stdout.strip().splitlines()[-1])
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in growth.items()}
    print(mib)
    inputs = 3  # K + 1 tensors: the base and two models (slerp: two models and the output)
    for method, temporaries in TEMPORARIES.items():
        if method not in growth:
            continue
        bound = (inputs + 1 + temporaries) * tensor_bytes + (24 << 20)
        assert count * tensor_bytes * 3 > 1.5 * bound
        assert growth[method] < bound, f"{method}: {mib[method]} > bound {bound / 2**20:.1f} MiB ({mib})"
    worst = (inputs + 1 + max(TEMPORARIES.values())) * tensor_bytes + (24 << 20)
    assert growth["in-memory"] > worst, f"the measurement missed an in-memory merge: {mib}"
