"""Train K trajectories on real data (scikit-learn's digits) and compare SGD, EMA, SWA, SAM + SWA, SWM and the ensemble.

All K trajectories start from one shared initialisation and differ only in the order
of the training data and their dropout masks. Each keeps an SWA average
(WeightAverager, mode="swa", updated once per epoch during the SWA phase under SWALR)
and an EMA average (updated every step). The SWA averages are merged with SWM. Every
model in the table, the SGD iterates included, is scored after update_bn recomputes
its BatchNorm statistics on the training set, so rows differ only in their weights.
The prediction ensemble of the K final SGD models is the reference that one merged
model approximates at K times lower inference cost.

The "SAM + SWA" row trains K more runs from the same init, each with its SGD twin's data order
and dropout seed, with swm_fused.sam.SAM around the same SGD and an SWA phase at the same fraction
of its epochs. SAM evaluates two gradients per step, so these runs get half the epochs: the same
budget counted in gradient evaluations (the output prints both counts).

The defaults (constant lr 0.05, SWA over the last 40% of the epochs, EMA decay 0.998)
came from a settings search on seeds 100-102 and were checked on seeds 0-9: EMA, SWA and
the SWM merge each beat the last SGD iterate in test accuracy on 8 or 9 of the 10 seeds
and in NLL on 8, by small margins (about 0.25 points, one or two test images, and
0.01-0.02 NLL); the ensemble gains most in NLL. On seeds 0-4 SWA also edged out SGD runs
whose learning rate anneals to near zero over the same epochs. A larger SWA-phase learning
rate widens SWA's lead over the last iterate only because that iterate gets worse. The
demo prints what held on each run.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

StateDict = Dict[str, Tensor]
POSTHOC_TRACKED = (0.05, 0.10)                       # sigma_rels PostHocEMA tracks on trajectory 1
POSTHOC_SIGMAS = (0.01, 0.03, 0.05, 0.08, 0.12, 0.2)  # sigma_rels reconstructed from its snapshots


@dataclass(frozen=True)
class Settings:
    """Every knob of the demo run; the command line sets those named in FLAG_HELP."""

    trajectories: int = 4
    epochs: int = 40
    seed: int = 0
    device: str = "cpu"
    lr: float = 0.05              # SGD learning rate before the SWA phase
    swa_lr: float = 0.05          # constant learning rate of the SWA phase (SWALR)
    swa_start: float = 0.6        # the SWA phase starts after this fraction of the epochs
    ema_decay: float = 0.998      # per step
    batch_size: int = 32
    width: int = 128
    dropout: float = 0.2
    weight_decay: float = 5e-4
    momentum: float = 0.9
    anneal_epochs: int = 4        # SWALR's cosine ramp from lr to swa_lr, at the start of the SWA phase
    sam_rho: float = 0.05         # SAM's neighbourhood radius for the "SAM + SWA" row

    @property
    def swa_start_epoch(self) -> int:
        """Epochs trained at ``lr`` before the SWA phase; the phase (at least one epoch) is the rest."""
        return min(self.epochs - 1, max(1, round(self.epochs * self.swa_start)))

    @property
    def sam_epochs(self) -> int:
        """Epochs of the SAM runs: half the SGD runs' (rounded down), as SAM evaluates two gradients per step."""
        return max(1, self.epochs // 2)

    @property
    def sam_swa_start_epoch(self) -> int:
        """The SAM runs' SWA phase starts at the same fraction of their epochs (at least one epoch of SWA)."""
        return min(self.sam_epochs - 1, max(1, round(self.sam_epochs * self.swa_start)))

    def check(self) -> None:
        """ValueError naming the first setting out of range, by its flag where it has one."""
        for name in ("trajectories", "epochs", "batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        for name in ("lr", "swa_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if not 0.0 < self.swa_start < 1.0:
            raise ValueError(f"--swa-start must be in (0, 1), got {self.swa_start}")
        if not (math.isfinite(self.sam_rho) and self.sam_rho >= 0.0):
            raise ValueError(f"--sam-rho must be a finite number >= 0, got {self.sam_rho}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.width < 1 or not 0.0 <= self.dropout < 1.0 or self.weight_decay < 0 or self.anneal_epochs < 1 \
                or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"settings out of range: {self}")


FLAG_HELP = {
    "trajectories": "number of SGD runs K (default: %(default)s)",
    "epochs": "epochs per run (default: %(default)s)",
    "seed": "seed for the train/test split, the init, data orders and dropout (default: %(default)s)",
    "device": "torch device to train on (default: %(default)s)",
    "lr": "SGD learning rate before the SWA phase (default: %(default)s)",
    "swa_lr": "constant learning rate of the SWA phase (default: %(default)s)",
    "swa_start": "fraction of the epochs before the SWA phase starts (default: %(default)s)",
    "ema_decay": "EMA decay per step (default: %(default)s)",
    "batch_size": "minibatch size (default: %(default)s)",
    "sam_rho": "SAM's rho for the SAM + SWA row (default: %(default)s)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags, with the defaults of :class:`Settings`."""
    defaults = Settings()
    for field in fields(Settings):
        if field.name in FLAG_HELP:
            parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                                default=getattr(defaults, field.name), help=FLAG_HELP[field.name])


@dataclass
class Data:
    """Standardised images (N x 64 float32) and labels, split into train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _digits() -> Tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as (images N x 64 float32, labels): its data file read directly when it is
    where scikit-learn keeps it (importing sklearn takes seconds, about a tenth of the demo), else load_digits()."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise RuntimeError("the demo needs scikit-learn for its bundled digits data: "
                           "pip install 'swm_fused[demo]'")
    for root in spec.submodule_search_locations or []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            import numpy as np
            table = np.loadtxt(path, delimiter=",")  # what load_digits reads: 64 pixels, then the label
            return torch.tensor(table[:, :-1], dtype=torch.float32), torch.tensor(table[:, -1].astype(int))
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the demo needs scikit-learn for its bundled digits data: "
                           "pip install 'swm_fused[demo]'") from None
    digits = load_digits()
    return torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.long)


def load_digits_data(seed: int, device: torch.device) -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split 2:1 by ``seed`` and standardised."""
    x, y = _digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = len(x) * 2 // 3
    train, test = order[:n_train], order[n_train:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return Data(x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device))


def make_model(settings: Settings) -> nn.Module:
    """An MLP 64 -> width -> width -> 10 with BatchNorm and dropout."""
    width = settings.width
    return nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(settings.dropout),
                         nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(settings.dropout),
                         nn.Linear(width, 10))


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tuple[Tensor, Tensor]]:
    """Shuffled minibatches; a last batch of one sample is dropped (BatchNorm needs two)."""
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) > 1:
            yield x[idx], y[idx]


def scores(log_probs: Tensor, y: Tensor) -> Tuple[float, float]:
    """(accuracy in %, mean NLL) of log-probabilities."""
    accuracy = (log_probs.argmax(1) == y).double().mean().item() * 100
    return accuracy, nn.functional.nll_loss(log_probs.double(), y).item()


class Evaluator:
    """Test-set log-probabilities of weights, after update_bn recomputes BatchNorm statistics on the training set."""

    def __init__(self, data: Data, settings: Settings):
        self.data = data
        self.model = make_model(settings).to(data.x_train.device)
        self.parameter_names = {name for name, _ in self.model.named_parameters()}
        self.loader = [(data.x_train,)]  # one batch: BatchNorm gets the statistics of the whole training set

    @torch.no_grad()
    def log_probs(self, state_dict: StateDict) -> Tensor:
        from .swa_utils import update_bn

        # Parameters only: update_bn resets and recomputes the BatchNorm buffers.
        self.model.load_state_dict({n: t for n, t in state_dict.items() if n in self.parameter_names}, strict=False)
        device = self.data.x_train.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # dropout is active while update_bn runs: fix its masks
            update_bn(self.loader, self.model)
        self.model.eval()
        return torch.log_softmax(self.model(self.data.x_test), dim=1)

    def scores(self, state_dict: StateDict) -> Tuple[float, float]:
        """(test accuracy in %, test NLL) of ``state_dict``'s parameters."""
        return scores(self.log_probs(state_dict), self.data.y_test)

    def nll(self, state_dict: StateDict) -> float:
        """Test NLL of ``state_dict``'s parameters (a loss for interpolation_barrier)."""
        return self.scores(state_dict)[1]


@dataclass
class Trajectory:
    """One SGD run's end points: parameters only (BatchNorm statistics are recomputed at evaluation)."""

    final: StateDict   # last SGD iterate
    ema: StateDict     # EMA of the iterates, one update per step
    swa: StateDict     # SWA of the iterates at the end of each SWA-phase epoch (SWALR's phase)
    fused_seconds: float  # in the EMA updates timed against torch's (``timed``), else 0
    torch_seconds: float
    ema_updates: int
    timed_updates: int = 0


def _clone(state_dict: StateDict) -> StateDict:
    return {name: tensor.detach().clone() for name, tensor in state_dict.items()}


def _update_clock(device: torch.device) -> Callable[[], float]:
    """Seconds spent in an update: this thread's CPU time on CPU (robust to other load on the
    machine); wall time after a synchronize on an accelerator, whose work is asynchronous."""
    if device.type == "cpu":
        return time.thread_time
    sync = getattr(torch, device.type).synchronize

    def clock() -> float:
        sync()
        return time.perf_counter()
    return clock


def train_trajectory(index: int, init: StateDict, data: Data, settings: Settings,
                     on_epoch: Callable[[], None], snapshot_dir: Optional[str] = None,
                     timed: bool = False) -> Trajectory:
    """Train trajectory ``index`` from ``init``: SGD, then an SWA phase under SWALR, with EMA and SWA averages.

    With ``snapshot_dir``, a PostHocEMA also tracks sigma_rel 0.05 and 0.10 every step and snapshots
    them there (float16) at the end of every epoch. With ``timed``, torch's AveragedModel EMA also
    runs every step, only to time the EMA update against it (one trajectory's steps are enough for
    a per-step time; the others skip that work)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from .averager import WeightAverager
    from .swa_utils import SWALR

    device = data.x_train.device
    torch.manual_seed(settings.seed * 1000 + index + 1)  # dropout masks of this trajectory
    order = torch.Generator().manual_seed(settings.seed * 1000 + index + 1)  # and its data order
    model = make_model(settings).to(device)
    model.load_state_dict(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = SWALR(optimizer, swa_lr=settings.swa_lr, anneal_epochs=settings.anneal_epochs)
    ema = WeightAverager(model, mode="ema", decay=settings.ema_decay)
    swa = WeightAverager(model, mode="swa")
    phema = None
    if snapshot_dir is not None:
        from .posthoc import PostHocEMA
        phema = PostHocEMA(model, POSTHOC_TRACKED, snapshot_dir=snapshot_dir)
    updaters = [("fused", ema.update)]
    if timed:  # torch's own EMA, doing the same averaging every step, only to time the update against
        torch_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay))
        updaters.append(("torch", lambda: torch_ema.update_parameters(model)))
    seconds = {"fused": 0.0, "torch": 0.0}
    clock = _update_clock(device)
    updates = 0
    for epoch in range(settings.epochs):
        in_swa_phase = epoch >= settings.swa_start_epoch
        model.train()
        for xb, yb in batches(data.x_train, data.y_train, settings.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            if timed:  # alternate which runs first, so neither always finds the caches the other warmed
                for name, update in (updaters if updates % 2 else updaters[::-1]):
                    t0 = clock()
                    update()
                    seconds[name] += clock() - t0
            else:
                ema.update()
            updates += 1
            if phema is not None:
                phema.update()
        if phema is not None:
            phema.snapshot()
        if in_swa_phase:
            swa.update()
        if settings.swa_start_epoch <= epoch + 1 < settings.epochs:
            scheduler.step()  # SWALR, after this epoch's optimizer steps: the next (SWA-phase) epoch's lr
        on_epoch()
    return Trajectory(final=_clone(dict(model.named_parameters())), ema=_clone(ema.average_state_dict()),
                      swa=_clone(swa.average_state_dict()), fused_seconds=seconds["fused"],
                      torch_seconds=seconds["torch"], ema_updates=updates, timed_updates=updates if timed else 0)


@dataclass
class SamTrajectory:
    """One SAM run: its SWA average and the gradient evaluations it took."""

    swa: StateDict
    grad_evals: int


def train_sam_trajectory(index: int, init: StateDict, data: Data, settings: Settings,
                         on_epoch: Callable[[], None]) -> SamTrajectory:
    """SAM (swm_fused.sam.SAM around the same SGD) for half the epochs, on trajectory ``index``'s data order,
    with an SWA phase under SWALR at the same fraction of its epochs. Each step evaluates two gradients;
    the second forward runs under sam_bn_bypass so BatchNorm statistics come from the first pass only."""
    from .averager import WeightAverager
    from .sam import SAM, sam_bn_bypass
    from .swa_utils import SWALR

    device = data.x_train.device
    torch.manual_seed(settings.seed * 1000 + index + 1)  # the SGD trajectory's dropout seed
    order = torch.Generator().manual_seed(settings.seed * 1000 + index + 1)  # and its data order
    model = make_model(settings).to(device)
    model.load_state_dict(init)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=settings.sam_rho, lr=settings.lr,
                    momentum=settings.momentum, weight_decay=settings.weight_decay)
    scheduler = SWALR(optimizer, swa_lr=settings.swa_lr, anneal_epochs=settings.anneal_epochs)
    swa = WeightAverager(model, mode="swa")
    grad_evals = 0
    for epoch in range(settings.sam_epochs):
        in_swa_phase = epoch >= settings.sam_swa_start_epoch
        model.train()
        for xb, yb in batches(data.x_train, data.y_train, settings.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.first_step(zero_grad=True)
            with sam_bn_bypass(model):
                nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.second_step()
            grad_evals += 2
        if in_swa_phase:
            swa.update()  # after second_step: the restored, stepped weights, never w + e_w
        if settings.sam_swa_start_epoch <= epoch + 1 < settings.sam_epochs:
            scheduler.step()  # after the optimizer steps (an SWA phase from epoch 0 starts at lr itself)
        on_epoch()
    return SamTrajectory(swa=_clone(swa.average_state_dict()), grad_evals=grad_evals)


@dataclass
class Row:
    """One line of the results table."""

    name: str
    accuracy: float   # test accuracy, %
    nll: float        # test negative log-likelihood, nats
    cost: str         # inference cost relative to one model


@dataclass
class Report:
    """Everything the demo prints, as numbers."""

    settings: Settings
    n_train: int
    n_test: int
    n_params: int
    rows: List[Row]
    barrier_losses: Tuple[float, ...]
    barrier: float
    fused_seconds: float
    torch_seconds: float
    ema_updates: int
    timed_updates: int = 0  # EMA updates timed against torch's (one trajectory's)
    grad_evals: Tuple[int, int] = (0, 0)  # per trajectory: (SGD runs, SAM runs)
    posthoc: Tuple[Tuple[float, float, float], ...] = ()  # (sigma_rel, test accuracy, test NLL), trajectory 1
    posthoc_sgd: Tuple[float, float] = (0.0, 0.0)  # trajectory 1's last SGD iterate: (accuracy, NLL)
    posthoc_files: int = 0  # snapshot files written
    sections: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # name -> (wall s, CPU s)

    def row(self, prefix: str) -> Row:
        """The table row whose name starts with ``prefix``."""
        return next(r for r in self.rows if r.name.startswith(prefix))


class _SectionClock:
    """Wall and process CPU seconds per named section of the demo (``with clock("name"): ...``)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, Tuple[float, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            before = self.seconds.get(name, (0.0, 0.0))
            self.seconds[name] = (before[0] + time.perf_counter() - wall, before[1] + time.process_time() - cpu)


def _mean_scores(evaluator: Evaluator, state_dicts: List[StateDict]) -> Tuple[float, float]:
    rows = [evaluator.scores(sd) for sd in state_dicts]
    return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)


def compare(settings: Settings, progress: bool = True) -> Report:
    """Train the K trajectories of ``settings`` and score every model of the table on the test set."""
    import tempfile

    from tqdm.auto import tqdm

    from .posthoc import reconstruct
    from .swm import interpolation_barrier, merge_trajectories

    settings.check()
    device = _parse_device(settings.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest (and steadiest) on one thread
    snapshots = tempfile.TemporaryDirectory(prefix="swm-fused-demo-phema-")
    clock = _SectionClock()
    try:
        with clock("data"):
            data = load_digits_data(settings.seed, device)
            torch.manual_seed(settings.seed)
            init = make_model(settings).to(device).state_dict()  # the shared initialisation
        runs: List[Trajectory] = []
        sam_runs: List[SamTrajectory] = []
        with tqdm(total=settings.trajectories * (settings.epochs + settings.sam_epochs), desc="training",
                  unit="epoch", disable=not progress) as bar:
            with clock("SGD runs"):
                for k in range(settings.trajectories):
                    runs.append(train_trajectory(k, init, data, settings, lambda: bar.update(1),
                                                 snapshot_dir=snapshots.name if k == 0 else None,
                                                 timed=k == 1))  # the one without post-hoc EMA
            with clock("SAM runs"):
                for k in range(settings.trajectories):
                    sam_runs.append(train_sam_trajectory(k, init, data, settings, lambda: bar.update(1)))
        evaluator = Evaluator(data, settings)
        with clock("evaluation"), tqdm(total=4, desc="evaluating", disable=not progress, leave=False) as bar:
            sgd = _mean_scores(evaluator, [r.final for r in runs])
            ensemble_probs = torch.stack([evaluator.log_probs(r.final).exp() for r in runs]).mean(0)
            ensemble = scores(ensemble_probs.clamp_min(1e-12).log(), data.y_test)
            bar.update(1)
            ema = _mean_scores(evaluator, [r.ema for r in runs])
            swa = _mean_scores(evaluator, [r.swa for r in runs])
            sam_swa = _mean_scores(evaluator, [r.swa for r in sam_runs])
            bar.update(1)
            swm = evaluator.scores(merge_trajectories([r.swa for r in runs]))
            bar.update(1)
            line = interpolation_barrier(runs[0].swa, runs[1].swa, evaluator.nll, steps=11)
            bar.update(1)
        with clock("post-hoc reconstruction"):
            posthoc = tuple((s, *evaluator.scores(reconstruct(snapshots.name, s))) for s in POSTHOC_SIGMAS)
            posthoc_sgd = evaluator.scores(runs[0].final)
            posthoc_files = len(os.listdir(snapshots.name))
    finally:
        torch.set_num_threads(threads)
        snapshots.cleanup()
    k = settings.trajectories
    rows = [Row("SGD (last iterate, mean of K)", *sgd, "1x"),
            Row("EMA (mean of K)", *ema, "1x"),
            Row("SWA (mean of K)", *swa, "1x"),
            Row("SAM + SWA (mean of K, same grad evals)", *sam_swa, "1x"),
            Row(f"SWM merge of the {k} SWA averages", *swm, "1x"),
            Row(f"ensemble of the {k} SGD models", *ensemble, f"{k}x")]
    return Report(settings=settings, n_train=len(data.x_train), n_test=len(data.x_test),
                  n_params=sum(t.numel() for t in runs[0].final.values()), rows=rows,
                  barrier_losses=line.losses, barrier=line.barrier,
                  fused_seconds=sum(r.fused_seconds for r in runs), torch_seconds=sum(r.torch_seconds for r in runs),
                  ema_updates=sum(r.ema_updates for r in runs), timed_updates=sum(r.timed_updates for r in runs),
                  grad_evals=(runs[0].ema_updates, sam_runs[0].grad_evals), posthoc=posthoc,
                  posthoc_sgd=posthoc_sgd, posthoc_files=posthoc_files, sections=dict(clock.seconds))


def _parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        if device.type != "cpu" and not hasattr(getattr(torch, device.type, None), "synchronize"):
            raise RuntimeError(f"{device.type} is not a device that trains models")
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for CUDA in a CPU build
        raise ValueError(f"--device {name!r} is not usable here: {str(exc).splitlines()[0]}") from None
    return device


def verdict(report: Report) -> str:
    """One plain sentence per averaged model: whether it beat the SGD last iterate on this run."""
    sgd = report.row("SGD")
    sentences = [f"On this run (one test image is {100 / report.n_test:.2f} points of accuracy):"]
    for prefix, label in (("EMA", "EMA"), ("SWA", "SWA"), ("SAM + SWA", "SAM + SWA"), ("SWM", "The SWM merge")):
        row = next((r for r in report.rows if r.name.startswith(prefix)), None)
        if row is None:
            continue
        better = {"accuracy": row.accuracy > sgd.accuracy, "NLL": row.nll < sgd.nll}
        change = f"{row.accuracy - sgd.accuracy:+.2f} points accuracy, {row.nll - sgd.nll:+.4f} NLL"
        if all(better.values()):
            sentences.append(f"{label} beat the SGD last iterate in both accuracy and NLL ({change}).")
        elif any(better.values()):
            won = "accuracy" if better["accuracy"] else "NLL"
            lost = "NLL" if better["accuracy"] else "accuracy"
            sentences.append(f"{label} beat the SGD last iterate in {won} but not in {lost} ({change}).")
        else:
            sentences.append(f"{label} did not beat the SGD last iterate in accuracy or NLL ({change}).")
    return " ".join(sentences)


def format_report(report: Report) -> str:
    """The demo's printed output: settings, table, verdict, barrier and update timing."""
    s = report.settings
    lines = [
        f"digits: {report.n_train} train / {report.n_test} test images; {s.trajectories} trajectories x {s.epochs} "
        f"epochs from one init (MLP, {report.n_params:,} parameters, BatchNorm, dropout {s.dropout}); "
        f"SGD lr {s.lr}, SWA phase from epoch {s.swa_start_epoch + 1} at lr {s.swa_lr}; EMA decay {s.ema_decay}",
        "",
        f"| {'model':<38} | test accuracy | test NLL | inference cost |",
        f"|{'-' * 40}|---------------|----------|----------------|",
    ]
    for row in report.rows:
        lines.append(f"| {row.name:<38} | {row.accuracy:12.2f}% | {row.nll:8.4f} | {row.cost:>14} |")
    lines += [
        "",
        verdict(report),
        "",
        f"SAM + SWA: {s.sam_epochs} epochs of SAM (rho {s.sam_rho}) around the same SGD, SWA phase from its epoch "
        f"{s.sam_swa_start_epoch + 1}; SAM evaluates two gradients per step, so it took {report.grad_evals[1]:,} "
        f"gradient evaluations per trajectory against {report.grad_evals[0]:,} for the SGD rows. At equal epochs "
        "it would cost 2x.",
        "",
        f"interpolation barrier between the SWA averages of trajectories 1 and 2: {report.barrier:.4f} test NLL",
        "  test NLL along the line: " + " ".join(f"{v:.3f}" for v in report.barrier_losses),
    ]
    if report.posthoc:
        best = min(report.posthoc, key=lambda r: r[2])
        lines += [
            "",
            f"post-hoc EMA (trajectory 1): sigma_rel {' and '.join(map(str, POSTHOC_TRACKED))} tracked every step, "
            f"{report.posthoc_files} float16 snapshots (one per profile per epoch); EMA lengths reconstructed after "
            "training, test NLL by sigma_rel: " + ", ".join(f"{s:g}: {nll:.4f}" for s, _, nll in report.posthoc),
            f"  best on the test set: sigma_rel {best[0]:g}, {best[1]:.2f}% accuracy, {best[2]:.4f} NLL (its last "
            f"SGD iterate: {report.posthoc_sgd[0]:.2f}%, {report.posthoc_sgd[1]:.4f}); chosen on the test set itself, "
            "so a real run would pick it on a validation split",
        ]
    timed = report.timed_updates or report.ema_updates
    fused_us = report.fused_seconds / timed * 1e6
    torch_us = report.torch_seconds / timed * 1e6
    clock = "CPU" if torch.device(s.device).type == "cpu" else "wall"
    lines.append(
        f"EMA update, {clock} time per step ({timed} updates of trajectory 2): swm_fused WeightAverager.update "
        f"{fused_us:.0f} us, torch AveragedModel.update_parameters with get_ema_multi_avg_fn {torch_us:.0f} us "
        f"({torch_us / max(fused_us, 1e-9):.2f}x). With {report.n_params:,} parameters both are bound by "
        "per-call Python overhead, not memory traffic; bench/ compares them on large models.")
    if report.sections:
        lines.append("time by section, wall (CPU): " + ", ".join(
            f"{name} {wall:.1f} s ({cpu:.1f} s)" for name, (wall, cpu) in report.sections.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``swm-fused demo``: train, compare, print. Bad settings raise ValueError before any work."""
    started = time.perf_counter()
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)})
    print(format_report(compare(settings)))
    print(f"total time: {time.perf_counter() - started:.1f} s wall, {time.process_time():.1f} s CPU")
    return 0
