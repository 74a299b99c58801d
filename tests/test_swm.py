"""swm_fused.swm: trajectory merges against float64 oracles, and the barrier check on real data."""
from __future__ import annotations

import math
import os
import random
import warnings
from typing import Dict, List

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from swm_fused import WeightAverager
from swm_fused.merge import greedy_soup
from swm_fused.swm import (DEFAULT_BARRIER_THRESHOLD, HighBarrierWarning, InterpolationBarrier,
                           interpolation_barrier, merge_trajectories)

from _helpers import FLOAT64_TOLERANCES, assert_close


def random_state_dict(dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> Dict[str, Tensor]:
    """Odd shapes, mixed float dtypes and an integer buffer, all non-zero."""
    shapes = [(7, 5), (5,), (3, 1, 3), (1,)]
    sd = {f"t{i}": (torch.randn(shape) + 0.5).to(dtypes[i % len(dtypes)]) for i, shape in enumerate(shapes)}
    sd["steps"] = torch.randint(1, 100, (), dtype=torch.int64)
    return sd


def oracle_merge(state_dicts: List[Dict[str, Tensor]], weights: List[float]) -> Dict[str, Tensor]:
    """float64 sum_k w_k theta_k with normalized weights; non-floating entries from the first."""
    total = math.fsum(weights)
    out = {}
    for key, first in state_dicts[0].items():
        if first.is_floating_point():
            out[key] = sum((w / total) * sd[key].double() for w, sd in zip(weights, state_dicts))
        else:
            out[key] = first
    return out


def assert_matches_oracle(merged: Dict[str, Tensor], oracle: Dict[str, Tensor], dtypes: Dict[str, torch.dtype]):
    assert sorted(merged) == sorted(oracle)
    for key, expected in oracle.items():
        assert merged[key].dtype == dtypes[key], key
        if expected.is_floating_point():
            atol, rtol = FLOAT64_TOLERANCES[dtypes[key]]
            assert_close(merged[key], expected, atol=atol, rtol=rtol, what=key)
        else:
            assert torch.equal(merged[key], expected), key


def test_list_weights_match_float64():
    sds = [random_state_dict() for _ in range(3)]
    weights = [random.uniform(0.5, 2.0) for _ in sds]
    merged = merge_trajectories(sds, weights)
    assert_matches_oracle(merged, oracle_merge(sds, weights), {k: v.dtype for k, v in sds[0].items()})


def test_uniform_weights_and_output_dtype():
    sds = [random_state_dict() for _ in range(4)]
    merged = merge_trajectories(sds, dtype=torch.float32)
    dtypes = {k: (torch.float32 if v.is_floating_point() else v.dtype) for k, v in sds[0].items()}
    assert_matches_oracle(merged, oracle_merge(sds, [1.0] * 4), dtypes)


def test_unnormalized_weights_are_used_as_given():
    sds = [random_state_dict((torch.float64,)) for _ in range(2)]
    merged = merge_trajectories(sds, [1.5, -0.25], normalize=False)
    for key in ("t0", "t1"):
        assert_close(merged[key], 1.5 * sds[0][key] - 0.25 * sds[1][key], atol=1e-12, rtol=1e-12, what=key)


def test_paths_averagers_and_state_dicts_mix(tmp_path):
    """A safetensors file, a torch checkpoint, a real WeightAverager and a duck-typed one."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    averager = WeightAverager(model, mode="swa")
    seen = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_().add_(0.5)
        seen.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
        averager.update()
    swa_oracle = {k: sum(s[k] for s in seen) / len(seen) for k in seen[0]}

    class DuckAverager:
        def __init__(self, sd):
            self.sd = sd

        def average_state_dict(self):
            return self.sd

    sds = [{k: torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    save_file(sds[0], str(tmp_path / "a.safetensors"))
    torch.save(sds[1], tmp_path / "b.pt")
    averages = [tmp_path / "a.safetensors", str(tmp_path / "b.pt"), averager, DuckAverager(sds[2])]
    weights = [1.0, 2.0, 3.0, 4.0]
    merged = merge_trajectories(averages, weights)
    oracle = oracle_merge([sds[0], sds[1], swa_oracle, sds[2]], weights)
    assert_matches_oracle(merged, oracle, {k: torch.float32 for k in oracle})


def test_greedy_keeps_the_trajectories_that_lower_the_loss():
    """Three runs near a target and two far from it: greedy keeps the three, as their mean."""
    target = {"w": torch.randn(40, 50, dtype=torch.float64), "b": torch.randn(50, dtype=torch.float64)}
    offsets = [0.1, 0.1, 3.0, 0.1, 3.0]
    sds = [{k: v + s * torch.randn_like(v) for k, v in target.items()} for s in offsets]

    def loss(sd):
        return sum(float(((sd[k] - target[k]) ** 2).sum()) for k in target)

    merged = merge_trajectories(sds, "greedy", loss)
    good = [sds[i] for i, s in enumerate(offsets) if s < 1]
    for key in target:
        assert_close(merged[key], sum(sd[key] for sd in good) / len(good), atol=1e-12, rtol=1e-12, what=key)
    soup, chosen = greedy_soup(sds, lambda sd: -loss(sd))
    assert sorted(chosen) == [0, 1, 3]
    assert all(torch.equal(soup[k], merged[k]) for k in target)


def test_interpolation_barrier_matches_float64():
    """Each point is (1-alpha) a + alpha b; a non-convex loss gives a known positive barrier."""
    a = {"x": torch.randn(30, dtype=torch.float64), "n": torch.tensor(3)}
    b = {"x": torch.randn(30, dtype=torch.float64), "n": torch.tensor(4)}
    seen_n = []

    def loss(sd):
        seen_n.append(int(sd["n"]))
        return float(torch.sin(3 * sd["x"]).sum() + (sd["x"] ** 2).sum())

    steps = 7
    result = interpolation_barrier(a, b, loss, steps=steps)
    assert isinstance(result, InterpolationBarrier)
    alphas = [i / (steps - 1) for i in range(steps)]
    expected = [float(torch.sin(3 * ((1 - t) * a["x"] + t * b["x"])).sum()
                      + (((1 - t) * a["x"] + t * b["x"]) ** 2).sum()) for t in alphas]
    assert result.alphas == pytest.approx(alphas, abs=0)
    assert result.losses == pytest.approx(expected, rel=1e-12, abs=1e-12)
    chord = [(1 - t) * expected[0] + t * expected[-1] for t in alphas]
    excess = [loss_ - c for loss_, c in zip(expected, chord)]
    assert result.barrier == pytest.approx(max(excess), rel=1e-12, abs=1e-12)
    assert result.worst_alpha == alphas[excess.index(max(excess))]
    assert seen_n == [3] * steps, "non-floating entries come from sd_a"


def test_barrier_of_a_convex_loss_is_zero_and_swap_symmetric():
    a, b = {"x": torch.randn(20, dtype=torch.float64)}, {"x": torch.randn(20, dtype=torch.float64)}
    quadratic = lambda sd: float((sd["x"] ** 2).sum())  # noqa: E731
    assert interpolation_barrier(a, b, quadratic).barrier == pytest.approx(0.0, abs=1e-12)
    bump = lambda sd: float(torch.exp(-((sd["x"] - 0.5 * (a["x"] + b["x"])) ** 2).sum()))  # noqa: E731
    forward, backward = interpolation_barrier(a, b, bump), interpolation_barrier(b, a, bump)
    assert forward.barrier > 0.5
    assert forward.barrier == pytest.approx(backward.barrier, rel=1e-12)


# ----------------------------------------------------------------------------- real data: digits

class Digits:
    """sklearn's bundled 8x8 digits (no download): a train split and a held-out split."""

    def __init__(self, seed: int):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=generator)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32)[perm], torch.tensor(y)[perm]
        self.x_train, self.y_train = x[:1200], y[:1200]
        self.x_test, self.y_test = x[1200:], y[1200:]
        self.eval_model = self.make_model(0)

    @staticmethod
    def make_model(init_seed: int) -> nn.Module:
        torch.manual_seed(init_seed)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def train(self, init_seed: int, order_seed: int, epochs: int = 4, batch_size: int = 64) -> Dict[str, Tensor]:
        model = self.make_model(init_seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        order = torch.Generator().manual_seed(order_seed)
        for _ in range(epochs):
            perm = torch.randperm(len(self.x_train), generator=order)
            for i in range(0, len(perm), batch_size):
                batch = perm[i:i + batch_size]
                loss = nn.functional.cross_entropy(model(self.x_train[batch]), self.y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def loss(self, state_dict: Dict[str, Tensor]) -> float:
        """Held-out cross-entropy: lower is better."""
        self.eval_model.load_state_dict(state_dict)
        return nn.functional.cross_entropy(self.eval_model(self.x_test), self.y_test).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only add overhead (3x the CPU time with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_runs(one_thread):
    """Runs A and B share an init and differ in data order; run C has its own init.

    Seeds are fresh each session (printed for replay). Over 20 seeds while choosing these
    settings, A-B barriers were 0 (the loss stays under the chord) and A-C barriers 0.51 or
    more (nats of held-out cross-entropy), against the 0.02 default threshold.
    """
    seed = int(os.environ.get("SWM_FUSED_TEST_SEED", random.randrange(2 ** 31)))
    print(f"digits seed={seed}")
    rng = random.Random(seed)
    init_a, init_c, order_a, order_b = (rng.randrange(2 ** 31) for _ in range(4))
    data = Digits(seed)
    runs = {"A": data.train(init_a, order_a), "B": data.train(init_a, order_b), "C": data.train(init_c, order_a)}
    return data, runs


def test_shared_init_has_a_low_barrier_and_different_inits_a_high_one(digits_runs):
    data, runs = digits_runs
    same = interpolation_barrier(runs["A"], runs["B"], data.loss)
    different = interpolation_barrier(runs["A"], runs["C"], data.loss)
    assert same.losses[0] == pytest.approx(data.loss(runs["A"]), rel=1e-6)
    assert different.losses[-1] == pytest.approx(data.loss(runs["C"]), rel=1e-6)
    assert max(same.losses[0], same.losses[-1], different.losses[-1]) < 1.0, "training failed (chance: 2.3)"
    assert same.barrier <= DEFAULT_BARRIER_THRESHOLD / 2, same
    assert different.barrier >= 0.2, different
    # The merge of the shared-init runs is as good as its parts; the other merge is not.
    assert data.loss(merge_trajectories([runs["A"], runs["B"]])) <= max(same.losses[0], same.losses[-1])
    assert data.loss(merge_trajectories([runs["A"], runs["C"]])) > max(different.losses[0], different.losses[-1])


def test_merge_trajectories_warns_only_across_inits(digits_runs):
    data, runs = digits_runs
    with pytest.warns(HighBarrierWarning, match=r"trajectories 0 and 2: barrier"):
        merged = merge_trajectories([runs["A"], runs["B"], runs["C"]], eval_fn=data.loss)
    assert_matches_oracle(merged, oracle_merge([runs["A"], runs["B"], runs["C"]], [1.0] * 3),
                          {k: torch.float32 for k in runs["A"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", HighBarrierWarning)
        merge_trajectories([runs["A"], runs["B"]], eval_fn=data.loss)
        merge_trajectories([runs["A"], runs["C"]], eval_fn=data.loss, barrier_threshold=None)
        greedy = merge_trajectories([runs["A"], runs["C"], runs["B"]], "greedy", data.loss, barrier_threshold=None)
    assert data.loss(greedy) <= min(data.loss(runs[k]) for k in "ABC")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"averages": []}, ValueError, "empty"),
    ({"averages": {"w": torch.ones(1)}}, TypeError, "list"),
    ({"averages": [{"w": torch.ones(1)}, "never-read.pt", 3]}, TypeError, r"averages\[2\] is a int"),
    ({"weights": "mean"}, ValueError, "'uniform', 'greedy'"),
    ({"weights": [1.0]}, ValueError, "1 weights for 2"),
    ({"weights": 0.5}, TypeError, "weights"),
    ({"weights": "greedy"}, ValueError, "needs eval_fn"),
    ({"eval_fn": "loss"}, TypeError, "callable"),
    ({"barrier_steps": 1}, ValueError, "barrier_steps"),
    ({"barrier_threshold": "high"}, TypeError, "barrier_threshold"),
])
def test_bad_arguments_raise_before_loading(kwargs, error, pattern, tmp_path):
    missing = tmp_path / "never-read.safetensors"  # every check runs before a file is opened
    args = {"averages": [{"w": torch.ones(1)}, missing], **kwargs}
    with pytest.raises(error, match=pattern):
        merge_trajectories(**args)


def test_mismatched_trajectories_name_the_tensor():
    a, b = {"w": torch.ones(2, 3)}, {"w": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="'w'"):
        merge_trajectories([a, b])
    with pytest.raises(ValueError, match="'w'"):
        interpolation_barrier(a, b, lambda sd: 0.0)


@pytest.mark.parametrize("loss,error,pattern", [
    (lambda sd: float("nan"), ValueError, "NaN"),
    (lambda sd: "low", TypeError, "real number"),
    (lambda sd: float("inf"), ValueError, "end points must be finite"),
])
def test_bad_losses(loss, error, pattern):
    a, b = {"w": torch.randn(4)}, {"w": torch.randn(4)}
    with pytest.raises(error, match=pattern):
        interpolation_barrier(a, b, loss)


def test_bad_steps():
    a = {"w": torch.randn(4)}
    with pytest.raises(ValueError, match="steps"):
        interpolation_barrier(a, a, lambda sd: 0.0, steps=1)
    with pytest.raises(TypeError, match="steps"):
        interpolation_barrier(a, a, lambda sd: 0.0, steps=2.5)
