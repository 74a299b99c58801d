"""Train K trajectories on real data (scikit-learn's digits) and compare SGD, EMA, SWA, SWM and the ensemble.

All K trajectories start from one shared initialisation and differ only in the order
of the training data. Each keeps an SWA average (WeightAverager, mode="swa", updated
once per epoch during the SWA phase under SWALR) and an EMA average (updated every
step). The SWA averages are merged with SWM; BatchNorm statistics are recomputed with
update_bn for every averaged model. The prediction ensemble of the K final SGD models
is the reference that one merged model approximates at K times lower inference cost.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", type=int, default=4, help="number of SGD runs K (default: 4)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per run; the last 40%% are the SWA phase")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the data orders")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate before the SWA phase")
    parser.add_argument("--swa-lr", type=float, default=0.05, help="constant learning rate of the SWA phase")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay per step")


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_data(seed: int, device: torch.device) -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split 2:1 and standardised."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = len(x) * 2 // 3
    train, test = order[:n_train], order[n_train:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return Data(x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) > 1:  # BatchNorm needs two samples
            yield x[idx], y[idx]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.log_softmax(model(x), dim=1)


def scores(log_probs: Tensor, y: Tensor) -> Tuple[float, float]:
    """(accuracy in %, mean NLL) of log-probabilities."""
    accuracy = (log_probs.argmax(1) == y).float().mean().item() * 100
    return accuracy, nn.functional.nll_loss(log_probs, y).item()


@dataclass
class Trajectory:
    final: Dict[str, Tensor]         # last SGD iterate (state dict)
    ema: Dict[str, Tensor]           # EMA weights with recomputed BN statistics
    swa: Dict[str, Tensor]           # SWA weights with recomputed BN statistics
    swa_params: Dict[str, Tensor]    # the SWA average itself, for SWM
    fused_seconds: float
    torch_seconds: float


def train_trajectory(index: int, init: Dict[str, Tensor], data: Data, args, progress) -> Trajectory:
    from . import WeightAverager
    from .swa_utils import SWALR, update_bn

    device = data.x_train.device
    model = make_model().to(device)
    model.load_state_dict(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    swa_start = int(math.ceil(args.epochs * 0.6))
    scheduler = SWALR(optimizer, swa_lr=args.swa_lr, anneal_epochs=max(1, args.epochs // 10))
    ema = WeightAverager(model, mode="ema", decay=args.ema_decay)
    swa = WeightAverager(model, mode="swa")
    # torch's own EMA, kept alongside only to time the averaging step against it
    torch_ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay))
    fused_seconds = torch_seconds = 0.0
    order = torch.Generator().manual_seed(args.seed * 1000 + index + 1)  # the only difference between runs
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in batches(data.x_train, data.y_train, 32, order):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            t0 = time.perf_counter()
            ema.update()
            t1 = time.perf_counter()
            torch_ema.update_parameters(model)
            fused_seconds += t1 - t0
            torch_seconds += time.perf_counter() - t1
        if epoch + 1 >= swa_start:
            swa.update()
            scheduler.step()
        progress.update(1)
    final = copy.deepcopy(model.state_dict())
    loader = [(xb,) for xb, _ in batches(data.x_train, data.y_train, 128, torch.Generator().manual_seed(0))]
    results = {}
    for name, averager in (("ema", ema), ("swa", swa)):
        with averager.swapped():
            update_bn(loader, model)
            results[name] = copy.deepcopy(model.state_dict())
        model.load_state_dict(final)
    return Trajectory(final, results["ema"], results["swa"], swa.average_state_dict(), fused_seconds, torch_seconds)


class BNRefreshedEvaluator:
    """Scores weights on the test set after recomputing BatchNorm statistics for them (update_bn)."""

    def __init__(self, data: Data):
        self.data = data
        self.model = make_model().to(data.x_train.device)
        self.loader = [(xb,) for xb, _ in batches(data.x_train, data.y_train, 128, torch.Generator().manual_seed(0))]

    def scores(self, state_dict: Dict[str, Tensor]) -> Tuple[float, float]:
        from .swa_utils import update_bn

        self.model.load_state_dict(state_dict, strict=False)
        update_bn(self.loader, self.model)
        return scores(predict(self.model, self.data.x_test), self.data.y_test)

    def nll(self, state_dict: Dict[str, Tensor]) -> float:
        return self.scores(state_dict)[1]


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .swm import interpolation_barrier, merge_trajectories

    if args.trajectories < 2:
        raise ValueError("--trajectories must be at least 2 (SWM and the ensemble need several runs)")
    if args.epochs < 2:
        raise ValueError("--epochs must be at least 2")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = load_digits_data(args.seed, device)
    init = make_model().state_dict()  # the shared initialisation
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; {args.trajectories} trajectories "
          f"x {args.epochs} epochs from one init, SWA from epoch {int(math.ceil(args.epochs * 0.6)) + 1}")
    runs: List[Trajectory] = []
    with tqdm(total=args.trajectories * args.epochs, desc="training", unit="epoch") as progress:
        for k in range(args.trajectories):
            runs.append(train_trajectory(k, init, data, args, progress))

    model = make_model().to(device)

    def evaluate(state_dict: Dict[str, Tensor]) -> Tuple[float, float]:
        model.load_state_dict(state_dict)
        return scores(predict(model, data.x_test), data.y_test)

    def mean_scores(state_dicts: List[Dict[str, Tensor]]) -> Tuple[float, float]:
        rows = [evaluate(sd) for sd in state_dicts]
        return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)

    refreshed = BNRefreshedEvaluator(data)
    swm_scores = refreshed.scores(merge_trajectories([r.swa_params for r in runs]))
    probabilities = []
    for r in runs:
        model.load_state_dict(r.final)
        probabilities.append(predict(model, data.x_test).exp())
    ensemble = scores(torch.stack(probabilities).mean(0).clamp_min(1e-12).log(), data.y_test)
    table = [
        ("SGD (last iterate, mean of K)", *mean_scores([r.final for r in runs]), "1x"),
        ("EMA (mean of K)", *mean_scores([r.ema for r in runs]), "1x"),
        ("SWA (mean of K)", *mean_scores([r.swa for r in runs]), "1x"),
        (f"SWM merge of the {len(runs)} SWA averages", *swm_scores, "1x"),
        (f"ensemble of the {len(runs)} SGD models", *ensemble, f"{len(runs)}x"),
    ]
    print()
    print(f"| {'model':<38} | test accuracy | test NLL | inference cost |")
    print(f"|{'-' * 40}|---------------|----------|----------------|")
    for name, accuracy, nll, cost in table:
        print(f"| {name:<38} | {accuracy:12.2f}% | {nll:8.4f} | {cost:>14} |")
    line = interpolation_barrier(runs[0].swa_params, runs[1].swa_params, refreshed.nll, steps=11)
    print(f"\ninterpolation barrier between the SWA averages of trajectories 1 and 2: {line.barrier:.4f} test NLL\n"
          "  test NLL along the line: " + " ".join(f"{v:.3f}" for v in line.losses))
    fused = sum(r.fused_seconds for r in runs)
    baseline = sum(r.torch_seconds for r in runs)
    print(f"time spent in EMA updates: swm_fused {fused * 1e3:.1f} ms, torch AveragedModel {baseline * 1e3:.1f} ms "
          f"({baseline / max(fused, 1e-9):.1f}x)")
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    return 0
