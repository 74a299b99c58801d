"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): track power-function EMA profiles while training, save snapshots of them, and after
training reconstruct the EMA of any length as a least-squares combination of the snapshots.

The math (equation numbers from the paper's arXiv version 2312.02696; docs/posthoc.md derives it):

- profile: the weight on iterate tau of an EMA at time t is proportional to tau**gamma, tau <= t;
- width (Eq. 123): ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))``;
- inverse (Eq. 126, Algorithm 2): gamma is the largest real root of
  ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma + (12 - sigma_rel**-2)``;
- per-update decay (Eq. 127): ``beta = (1 - dt / t) ** (gamma + 1)``, dt the training time since
  the previous update (the first update, dt = t, copies);
- inner product of two normalised profiles (Eq. 151, Algorithm 3), and the reconstruction
  (Algorithm 3): ``x = lstsq(A, b)``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p*>``, then x / sum(x).

The math is float64 numpy on the host: a handful of numbers per snapshot, never a tensor.
:class:`PostHocEMA` tracks the profiles on the averaging engine (one fused ``ema_multi_`` pass per
update) and writes snapshots; :func:`reconstruct` (and ``swm-fused phema``) rebuilds any profile
from them. docs/posthoc.md describes the API and the snapshot format.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .distributed import is_dtensor

MAX_SIGMA_REL = 12 ** -0.5
"""sigma_rel of gamma = 0, a uniform average (about 0.288675); wider profiles would need gamma < 0: rejected."""

Profile = Tuple[float, float]  # (t, sigma_rel): a snapshot's or a target's training time and width


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` >= 0 (Eq. 123)."""
    gamma = _real("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function profile of relative width ``sigma_rel`` (Eq. 126, Algorithm 2).

    ``sigma_rel`` must lie in (0, 0.288675]: 0.05 and 0.10 give about 16.97 and 6.94.
    """
    sigma_rel = _real("sigma_rel", sigma_rel)
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.6f}] (gamma >= 0), got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9 * max(1.0, s)].real.max())


def power_function_beta(t: float, dt: float, gamma: float) -> float:
    """The decay of an update at training time ``t``, ``dt`` after the previous one (Eq. 127).

    ``avg = beta * avg + (1 - beta) * model`` keeps the profile tau**gamma exactly, however
    unevenly the updates are spaced; ``dt == t`` (the first update) gives 0: a copy.
    """
    t, dt, gamma = _real("t", t), _real("dt", dt), _real("gamma", gamma)
    if not 0.0 < dt <= t:
        raise ValueError(f"need 0 < dt <= t, got t={t}, dt={dt}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return (1.0 - dt / t) ** (gamma + 1.0)


def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> of two normalised power-function profiles ending at t_a and t_b (Eq. 151).

    p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1) on [0, t], so the integral of p_a p_b is
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * min**(gamma_a + gamma_b + 1) / (t_a**(gamma_a+1) t_b**(gamma_b+1)).
    """
    ratio = t_a / t_b
    exponent = gamma_b if t_a < t_b else -gamma_a
    return (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent / ((gamma_a + gamma_b + 1) * max(t_a, t_b))


def solve_coefficients(snapshots: Sequence[Profile], target: Profile) -> np.ndarray:
    """Weights x (summing to 1) with sum_i x_i snapshot_i closest to the target profile (Algorithm 3).

    ``snapshots`` are (t_i, sigma_rel_i) pairs, ``target`` is (t*, sigma_rel*). Snapshots taken
    after t* are left out (weight 0). Raises ``ValueError`` when fewer than two distinct profiles
    remain, or when no snapshot was taken at t* itself (the end of the target's profile would not
    be covered).
    """
    t_star, s_star = _real("target t", target[0]), _real("target sigma_rel", target[1])
    if t_star <= 0:
        raise ValueError(f"target t must be > 0, got {t_star}")
    g_star = sigma_rel_to_gamma(s_star)
    profiles = [(_real(f"snapshots[{i}] t", t), _real(f"snapshots[{i}] sigma_rel", s))
                for i, (t, s) in enumerate(snapshots)]
    for i, (t, _) in enumerate(profiles):
        if t <= 0:
            raise ValueError(f"snapshots[{i}] has t={t}; times must be > 0")
    used = [i for i, (t, _) in enumerate(profiles) if t <= t_star]
    if not any(profiles[i][0] == t_star for i in used):
        times = sorted({t for t, _ in profiles})
        raise ValueError(f"no snapshot was taken at the target time {t_star:g} (snapshot times: "
                         f"{', '.join(f'{t:g}' for t in times[-5:])}{' ...' if len(times) > 5 else ''})")
    distinct = {profiles[i] for i in used}
    if len(distinct) < 2:
        raise ValueError(f"need at least two distinct snapshot profiles at or before t={t_star:g}, got {len(distinct)}")
    gammas = {i: sigma_rel_to_gamma(profiles[i][1]) for i in used}
    a = np.array([[profile_inner_product(profiles[i][0], gammas[i], profiles[j][0], gammas[j]) for j in used]
                  for i in used])
    b = np.array([profile_inner_product(profiles[i][0], gammas[i], t_star, g_star) for i in used])
    x_used = np.linalg.lstsq(a, b, rcond=None)[0]
    x = np.zeros(len(profiles))
    x[used] = x_used / x_used.sum()
    return x


def profile_weights(times: Iterable[float], updates: Sequence[Tuple[float, float]]) -> np.ndarray:
    """The weight each iterate carries in an EMA after ``updates`` [(t, beta), ...] (a test oracle).

    ``times`` are the training times of the iterates folded in, in order; update j folds iterate j
    with ``avg = beta_j * avg + (1 - beta_j) * theta_j``.
    """
    times = list(times)
    weights = np.zeros(len(times))
    for j, (_, beta) in enumerate(updates):
        weights[:j] *= beta
        weights[j] = 1.0 - beta
    return weights


def check_sigma_rels(sigma_rels: Union[float, Sequence[float]]) -> Tuple[float, ...]:
    """sigma_rel values as a tuple, each checked (a ValueError names the bad one)."""
    values = (sigma_rels,) if isinstance(sigma_rels, numbers.Real) else tuple(sigma_rels)
    if not values:
        raise ValueError("give at least one sigma_rel")
    for s in values:
        sigma_rel_to_gamma(s)
    return values


# =====================================================================================================
# Tracking profiles while training, snapshots, and reconstruction from them
# =====================================================================================================

SNAPSHOT_PREFIX = "phema-"
"""Snapshot files are ``phema-t{t:012d}-sigma{sigma_rel}.safetensors``; nothing else in the folder is read."""
SNAPSHOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TIME_UNITS = ("steps", "samples")
_META = "swm_fused.phema."  # metadata keys: swm_fused.phema.{sigma_rel,gamma,t,time,step,samples,fingerprint}
_STATE_FORMAT = 1


def model_fingerprint(shapes: Mapping[str, Sequence[int]]) -> str:
    """A hash of the tensors' names and shapes (order-free): snapshots of different models differ."""
    text = json.dumps(sorted((name, [int(d) for d in shape]) for name, shape in shapes.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


SnapshotLayout = List[Tuple[str, torch.dtype, Tuple[int, ...]]]


def _write_snapshot(path: Path, layout: SnapshotLayout, metadata: Mapping[str, str], tensors: Sequence[Tensor]) -> None:
    """One snapshot file of local tensors, atomically (a temporary name beside it, fsync, rename)."""
    from .merge import writer

    with writer.atomic_output(path) as file:
        file.write(writer.safetensors_header(layout, metadata))
        for (_, dtype, _), tensor in zip(layout, tensors):
            writer.write_tensor(file, tensor.to(dtype))


def _write_gathered(path: Path, layout: SnapshotLayout, metadata: Mapping[str, str], tensors: Sequence[Tensor]) -> None:
    """One snapshot file of a sharded profile, written by rank 0 as full tensors. Collective: every rank
    calls it with the same layout and joins each gather (``full_tensor``), one tensor at a time.

    A failure to write on rank 0 stops its writing, never the gathers (the other ranks wait in them);
    afterwards one broadcast tells every rank whether the file was written, and all raise if not.
    """
    import torch.distributed as dist

    from .merge import writer

    output = file = error = None
    if dist.get_rank() == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            opened = writer.atomic_output(path)
            file = opened.__enter__()
            output = opened
            file.write(writer.safetensors_header(layout, metadata))
        except Exception as exc:
            error, file = exc, None
    try:
        for (_, dtype, _), tensor in zip(layout, tensors):
            full = tensor.full_tensor() if is_dtensor(tensor) else tensor  # a collective: all ranks, same order
            if file is not None:
                try:
                    writer.write_tensor(file, full.to(dtype))
                except Exception as exc:
                    error, file = exc, None
            del full  # before the next gather: one full tensor at a time
    except BaseException as exc:  # a gather failed (or an interrupt): remove the temporary file, give up
        if output is not None:
            output.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if output is not None:
        if error is None:
            try:
                output.__exit__(None, None, None)  # fsync, rename into place
            except Exception as exc:
                error = exc
        else:
            output.__exit__(type(error), error, error.__traceback__)  # removes the temporary file
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"snapshot: rank 0 could not write {path}: {status[0]}")


class PostHocEMA:
    """Power-function EMA profiles of a model (EDM2's post-hoc EMA), with snapshots to reconstruct any length later.

    Args:
        model: an ``nn.Module`` (its parameters) or a mapping name -> tensor, as for
            :class:`~swm_fused.AveragingEngine`.
        sigma_rels: the profiles' relative widths, each in (0, 0.288675]; EDM2 tracks 0.05 and 0.10.
        snapshot_every: take a snapshot whenever an update crosses a multiple of this many time
            units (steps or samples); None: only when :meth:`snapshot` is called.
        snapshot_dir: where snapshots go (created when the first one is written).
        snapshot_dtype: dtype of the snapshot files (float16 by default, as EDM2).
        time: ``"steps"`` (t is the step number) or ``"samples"`` (t is the number of training
            samples seen); only ratios of times enter the profiles.
        dtype: the profiles' dtype (float32: fp32 profiles of a bf16 model).
        skip_nonfinite: an update whose model tensors hold NaN/Inf leaves every profile unchanged
            (checked on the device, no host sync).
        device: where the profiles live (None: next to each tensor; ``"cpu"``: offloaded, the model
            copied into a staging buffer there at each update, pinned for a CUDA model).

    One :class:`~swm_fused.AveragingEngine` per profile; :meth:`update` folds the model into all of
    them in one :func:`~swm_fused.ema_multi_` pass (:meth:`AveragingEngine.ema_multi`: on one
    device, one call into C++ with the NaN/Inf check and the counters, ``BoundLists.step_multi_``).
    DTensor-sharded models work: updates average the shards, :meth:`snapshot` (collective) writes
    full tensors from rank 0.

    Time and skipped updates: the host cannot see the device's NaN/Inf flag without a sync, so
    the profile's time advances on every :meth:`update` call, applied or skipped. A skipped update
    at ``t`` leaves the profile at its previous state; the next applied update at ``t'`` scales
    the old average by ``(t / t')**(gamma+1)``, so the mass the skipped iterate would have had,
    on ``(t_prev, t]``, goes to the earlier iterates in proportion to their weights. The profile
    remains a convex combination ending at ``t'``, slightly wider than ``tau**gamma``; snapshots
    record ``t`` as the host counts it. If the very first update is skipped, the profiles keep the
    model as it was when this object was built. ``skipped`` counts skipped updates (a device tensor).
    """

    def __init__(self, model: Any, sigma_rels: Union[float, Sequence[float]] = (0.05, 0.10),
                 snapshot_every: Optional[int] = None, snapshot_dir: Optional[Union[str, os.PathLike]] = None,
                 snapshot_dtype: torch.dtype = torch.float16, time: str = "steps",
                 dtype: torch.dtype = torch.float32, skip_nonfinite: bool = True,
                 device: Optional[Union[str, torch.device]] = None):
        from .engine import AveragingEngine

        self.sigma_rels = check_sigma_rels(sigma_rels)
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"PostHocEMA: sigma_rels repeat a value: {list(self.sigma_rels)}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        if time not in TIME_UNITS:
            raise ValueError(f"PostHocEMA: time must be 'steps' or 'samples', got {time!r}")
        if snapshot_every is not None:
            snapshot_every = _count("PostHocEMA: snapshot_every", snapshot_every)
            if snapshot_every <= 0:
                raise ValueError(f"PostHocEMA: snapshot_every must be > 0, got {snapshot_every}")
            if snapshot_dir is None:
                raise ValueError("PostHocEMA: snapshot_every needs a snapshot_dir")
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise TypeError(f"PostHocEMA: snapshot_dtype must be float16, bfloat16, float32 or float64, "
                            f"got {snapshot_dtype}")
        self.time = time
        self.snapshot_every = snapshot_every
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.snapshot_dtype = snapshot_dtype
        self.engines = [AveragingEngine(model, dtype=dtype, device=device, skip_nonfinite=skip_nonfinite,
                                        what=f"PostHocEMA(sigma_rel={s})") for s in self.sigma_rels]
        first = self.engines[0]
        self.fingerprint = model_fingerprint({n: t.shape for n, t in zip(first.names, first.model_tensors())})
        self.t = 0              # time of the last update (0: none yet)
        self.step = 0           # step of the last update
        self.samples: Optional[int] = None  # samples seen at the last update, when given
        self._snapshot_t = 0    # time of the last snapshot

    # ------------------------------------------------------------------------------ updating
    def update(self, step: Optional[int] = None, samples: Optional[int] = None) -> None:
        """Fold the model into every profile at the current time.

        ``step`` is the training step just completed (default: the previous one + 1); ``samples``
        the number of training samples seen so far (required with ``time="samples"``). Call it
        as often as you like: each profile's decay uses the time since the previous update
        (Eq. 127), so updating every 10 steps keeps the same profile as updating every step.
        Time must increase from call to call. A snapshot follows when ``snapshot_every`` is crossed.
        """
        from .engine import AveragingEngine

        step = self.step + 1 if step is None else _count("update: step", step)
        if samples is not None:
            samples = _count("update: samples", samples)
        if self.time == "samples" and samples is None:
            raise ValueError("update: time='samples' needs samples= (training samples seen so far)")
        t = step if self.time == "steps" else samples
        if t <= self.t:
            raise ValueError(f"update: time must increase: got {self.time} {t} after {self.t}")
        # power_function_beta(t, t - self.t, g) for each profile, inline: t and dt are checked ints, the
        # gammas were checked at construction (the same float operations, so the same betas)
        ratio = 1.0 - (t - self.t) / t
        weights = [1.0 - ratio ** (g + 1.0) for g in self.gammas]
        AveragingEngine.ema_multi(self.engines, weights)
        self.t, self.step, self.samples = t, step, samples
        every = self.snapshot_every
        if every is not None and t // every > self._snapshot_t // every:
            self.snapshot()

    @property
    def skipped(self) -> Tensor:
        """Updates skipped for NaN/Inf (a 0-dim device tensor; reading it as a number syncs)."""
        return self.engines[0].skipped

    def profile_state_dict(self, sigma_rel: float) -> Dict[str, Tensor]:
        """Name -> the tracked profile ``sigma_rel`` (views into the live average)."""
        return self.engines[self._index(sigma_rel)].average_state_dict()

    def _index(self, sigma_rel: float) -> int:
        try:
            return self.sigma_rels.index(sigma_rel)
        except ValueError:
            raise ValueError(f"sigma_rel {sigma_rel} is not tracked; tracked: {list(self.sigma_rels)}") from None

    # ----------------------------------------------------------------------------- snapshots
    def snapshot_path(self, sigma_rel: float, t: Optional[int] = None) -> Path:
        if self.snapshot_dir is None:
            raise ValueError("snapshot: this PostHocEMA has no snapshot_dir")
        return self.snapshot_dir / f"{SNAPSHOT_PREFIX}t{self.t if t is None else t:012d}-sigma{sigma_rel!r}.safetensors"

    @torch.no_grad()
    def snapshot(self) -> List[Path]:
        """Write every profile at the current time: one safetensors file per profile, each atomically
        (a temporary name beside it, fsync, ``os.replace``). Returns the paths.

        Sharded (DTensor) profiles are written as full tensors, gathered one tensor at a time
        (``DTensor.full_tensor``: peak extra memory one full tensor); only rank 0 writes, the other
        ranks write nothing (not even the folder) and return the paths rank 0 wrote. **Collective**
        then: every rank must call it (an update that crosses ``snapshot_every`` does, on every rank
        alike), and rank 0 must belong to the meshes of every sharded tensor. If rank 0 cannot write,
        every rank raises (rank 0 its error, the others a RuntimeError saying so) after the gathers.
        """
        if self.snapshot_dir is None:
            raise ValueError("snapshot: this PostHocEMA has no snapshot_dir")
        if self.t == 0:
            raise ValueError("snapshot: no update yet; a profile needs t > 0")
        paths = []
        for sigma_rel, gamma, engine in zip(self.sigma_rels, self.gammas, self.engines):
            average = engine.average_state_dict()
            metadata = {"format": "pt", _META + "sigma_rel": repr(float(sigma_rel)), _META + "gamma": repr(gamma),
                        _META + "t": str(self.t), _META + "time": self.time, _META + "step": str(self.step),
                        _META + "samples": "" if self.samples is None else str(self.samples),
                        _META + "fingerprint": self.fingerprint}
            layout = [(name, self.snapshot_dtype if t.is_floating_point() else t.dtype, tuple(t.shape))
                      for name, t in average.items()]
            path = self.snapshot_path(sigma_rel)
            if any(is_dtensor(t) for t in average.values()):
                _write_gathered(path, layout, metadata, list(average.values()))
            else:
                self.snapshot_dir.mkdir(parents=True, exist_ok=True)
                _write_snapshot(path, layout, metadata, list(average.values()))
            paths.append(path)
        self._snapshot_t = self.t
        return paths

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (profile averages are live views)."""
        return {"format": _STATE_FORMAT, "sigma_rels": list(self.sigma_rels), "time": self.time, "t": self.t,
                "step": self.step, "samples": self.samples, "snapshot_t": self._snapshot_t,
                "fingerprint": self.fingerprint,
                "profiles": [{"average": e.average_state_dict(), "n_updates": e.attempts[0],
                              "n_averaged": e.count(0).clone(), "skipped": e.skipped.clone()} for e in self.engines]}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; everything is checked first, so on error nothing changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: expected a mapping, got {type(state).__name__}")
        keys = ("format", "sigma_rels", "time", "t", "step", "samples", "snapshot_t", "fingerprint", "profiles")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"load_state_dict: missing keys {missing}")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"load_state_dict: unknown format {state['format']!r}")
        if tuple(state["sigma_rels"]) != self.sigma_rels or state["time"] != self.time:
            raise ValueError(f"load_state_dict: the state tracks sigma_rels {list(state['sigma_rels'])} in "
                             f"{state['time']}, this PostHocEMA {list(self.sigma_rels)} in {self.time}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("load_state_dict: the state is of another model (names or shapes differ)")
        for key in ("t", "step", "snapshot_t"):
            _count(f"load_state_dict: {key}", state[key])
        if len(state["profiles"]) != len(self.engines):
            raise ValueError(f"load_state_dict: {len(state['profiles'])} profiles for {len(self.engines)}")
        for engine, profile in zip(self.engines, state["profiles"]):
            engine.check_average("load_state_dict", profile["average"])
        for engine, profile in zip(self.engines, state["profiles"]):
            engine.load_average(profile["average"])
            engine.set_counters([profile["n_averaged"]], [int(profile["n_updates"])], profile["skipped"])
        self.t, self.step, self._snapshot_t = int(state["t"]), int(state["step"]), int(state["snapshot_t"])
        self.samples = None if state["samples"] is None else int(state["samples"])

    def __repr__(self) -> str:
        return (f"PostHocEMA(sigma_rels={list(self.sigma_rels)}, time={self.time!r}, t={self.t}, "
                f"snapshot_every={self.snapshot_every}, snapshot_dir={self.snapshot_dir})")


# ------------------------------------------------------------------------------ reconstruction
class Snapshot(NamedTuple):
    """One snapshot file, as its metadata describes it."""
    path: Path
    t: int
    sigma_rel: float
    time: str
    fingerprint: str


def _metadata(path: Path) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its header was validated by the reader)."""
    import struct
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(length).decode("utf-8")).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def read_snapshots(snapshot_dir: Union[str, os.PathLike]) -> List[Snapshot]:
    """Every snapshot in ``snapshot_dir`` (``phema-*.safetensors``; temporary files of interrupted writes,
    which start with a dot, are never read), checked to be of one model and one time unit."""
    from .merge.readers import SafetensorsFile

    folder = Path(snapshot_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such snapshot folder")
    snapshots = []
    for path in sorted(folder.glob(SNAPSHOT_PREFIX + "*.safetensors")):
        reader = SafetensorsFile(str(path))  # validates the header against the file
        try:
            shapes = {k: info.shape for k, info in reader.infos.items()}
        finally:
            reader.close()
        meta = _metadata(path)
        try:
            snap = Snapshot(path, int(meta[_META + "t"]), float(meta[_META + "sigma_rel"]), meta[_META + "time"],
                            meta[_META + "fingerprint"])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: not a post-hoc EMA snapshot (no {_META}* metadata)") from None
        if model_fingerprint(shapes) != snap.fingerprint:
            raise ValueError(f"{path}: its tensors do not match its recorded model fingerprint")
        snapshots.append(snap)
    if not snapshots:
        raise ValueError(f"{folder}: no post-hoc EMA snapshots ({SNAPSHOT_PREFIX}*.safetensors)")
    fingerprints = {s.fingerprint for s in snapshots}
    if len(fingerprints) > 1:
        by_print = {f: next(s.path.name for s in snapshots if s.fingerprint == f) for f in fingerprints}
        raise ValueError(f"{folder}: snapshots of {len(fingerprints)} different models (names or shapes differ), "
                         f"e.g. {', '.join(sorted(by_print.values()))}; keep one model's snapshots per folder")
    units = {s.time for s in snapshots}
    if len(units) > 1:
        raise ValueError(f"{folder}: snapshots count time in both steps and samples")
    return snapshots


def plan_reconstruction(snapshots: Sequence[Snapshot], sigma_rel: float,
                        at: Optional[int] = None) -> Tuple[List[Path], List[float], int]:
    """(paths, weights, t*): the snapshots to combine for the profile ``sigma_rel`` at ``at`` (default:
    the latest snapshot time), with nonzero weights summing to 1. ValueError on bad input."""
    sigma_rel_to_gamma(sigma_rel)
    t_star = max(s.t for s in snapshots) if at is None else _count("at", at)
    x = solve_coefficients([(s.t, s.sigma_rel) for s in snapshots], (t_star, sigma_rel))
    used = [i for i in range(len(snapshots)) if x[i] != 0.0]
    return [snapshots[i].path for i in used], [float(x[i]) for i in used], t_star


def reconstruction_metadata(snapshots: Sequence[Snapshot], sigma_rel: float, paths: Sequence[Path],
                            weights: Sequence[float], t_star: int) -> Dict[str, str]:
    """The post-hoc facts of one reconstruction (what :func:`plan_reconstruction` returned), as safetensors
    string metadata: ``swm_fused.phema.`` + ``kind`` (``reconstruction``), ``sigma_rel``, ``gamma``, ``t``
    (the target time), ``time`` (its unit), ``snapshots`` (JSON list of the snapshot file names used),
    ``coefficients`` (JSON list of their weights x_i, in that order, summing to 1) and ``fingerprint``."""
    return {_META + "kind": "reconstruction", _META + "sigma_rel": repr(float(sigma_rel)),
            _META + "gamma": repr(sigma_rel_to_gamma(sigma_rel)), _META + "t": str(t_star),
            _META + "time": snapshots[0].time, _META + "snapshots": json.dumps([Path(p).name for p in paths]),
            _META + "coefficients": json.dumps([float(w) for w in weights]),
            _META + "fingerprint": snapshots[0].fingerprint}


@torch.no_grad()
def reconstruct(snapshot_dir: Union[str, os.PathLike], sigma_rel: float, at: Optional[int] = None
                ) -> Dict[str, Tensor]:
    """The EMA of width ``sigma_rel`` at time ``at`` (default: the last snapshot) from the snapshots in
    ``snapshot_dir``: ``sum_i x_i theta_i`` with :func:`solve_coefficients`'s weights, accumulated
    in float32 tensor by tensor (float32 tensors out)."""
    from .merge.readers import SafetensorsFile

    paths, weights, _ = plan_reconstruction(read_snapshots(snapshot_dir), sigma_rel, at)
    readers = [SafetensorsFile(str(p)) for p in paths]
    try:
        out: Dict[str, Tensor] = {}
        for key in readers[0].infos:
            acc = None
            for reader, w in zip(readers, weights):
                tensor = reader.read(key)
                term = tensor.to(torch.float32) * w
                acc = term if acc is None else acc.add_(term)
                reader.release(key, tensor)
            out[key] = acc
        return out
    finally:
        for reader in readers:
            reader.close()
