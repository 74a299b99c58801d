"""Call every public op once per backend on small, odd-sized, mixed-dtype tensor lists.

Meant to run under ``compute-sanitizer --tool memcheck`` (bench/gpu_check.sh does), so that every
kernel launch of the cuda and triton backends touches memory the sanitizer watches:

    compute-sanitizer --tool memcheck --error-exitcode 3 python bench/sanitize_ops.py

Each call is also checked against the reference backend on copies of the same inputs, with a loose
bound (a few units in the last place of the output dtype, scaled by the inputs' magnitude): the tests
check exactness, this only catches garbage. ``--device cpu`` runs the cpp and reference backends on
CPU tensors instead (a dry run of this script for CI). Exit status 0 when every call ran and matched.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:
    import swm_fused
except ImportError:  # not installed: use this checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import swm_fused

# Odd sizes (no multiple of a vector width, a block or a chunk), a 0-d tensor, a non-contiguous view and a
# view starting one element into its storage (misaligned for vector loads).
SHAPES: Sequence[Tuple[int, ...]] = [(1,), (7,), (33, 5), (1023,), (4099,), (3, 17, 5), (), (70001,)]
AVERAGE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SOURCE_DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.float64]
MERGE_KS = (1, 3, 8, 11)
DEFAULT_BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpp", "reference")}


def _tensor(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
            layout: str = "contiguous", positive: bool = False) -> Tensor:
    """A random tensor of ``shape``; ``layout`` "strided" gives a transposed view, "offset" a view at offset 1."""
    numel = 1
    for s in shape:
        numel *= s
    strided = layout == "strided" and len(shape) >= 2
    base_numel = numel + 1 if layout == "offset" else numel
    base = torch.randn(base_numel, generator=gen, dtype=torch.float32)
    if positive:
        base = base.abs()
    base = base.to(dtype).to(device)  # cast and move the whole base, then take the view on the device
    if strided:
        return base.view(shape[::-1]).permute(*range(len(shape) - 1, -1, -1))
    if layout == "offset":
        return base[1:].view(shape)
    return base.view(shape)


def _clone(lists: Sequence[Sequence[Tensor]]) -> List[List[Tensor]]:
    """Copies of every tensor with the same strides and storage offset (``clone()`` would compact the views)."""
    out = []
    for ts in lists:
        copies = []
        for t in ts:
            n = t.untyped_storage().nbytes() // t.element_size()
            storage = torch.empty(n, dtype=t.dtype, device=t.device)
            storage.copy_(torch.as_strided(t, (n,), (1,), 0))
            copies.append(torch.as_strided(storage, t.shape, t.stride(), t.storage_offset()))
        out.append(copies)
    return out


def _layout(i: int) -> str:
    return ("contiguous", "strided", "offset")[i % 3]


def _lists(device: torch.device, seed: int, n_lists: int, dtypes: Sequence[torch.dtype],
           positive: Sequence[bool] = ()) -> List[List[Tensor]]:
    """``n_lists`` paired lists over SHAPES; list j position i has dtype dtypes[(i + j) % len(dtypes)]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n_lists):
        pos = positive[j] if j < len(positive) else False
        out.append([_tensor(shape, dtypes[(i + j) % len(dtypes)], device, gen, _layout(i + j), pos)
                    for i, shape in enumerate(SHAPES)])
    return out


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _max_abs(tensors: Sequence[Tensor]) -> float:
    return max((float(t.double().abs().max()) for t in tensors if t.numel()), default=0.0)


def _compare(got: Sequence[Tensor], want: Sequence[Tensor], scale: float) -> float:
    """The largest |got - want| in units of (eps(out dtype) * scale); raises on NaN or shape changes."""
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise AssertionError(f"position {i}: {tuple(g.shape)} {g.dtype} vs reference {tuple(w.shape)} {w.dtype}")
        diff = (g.double().cpu() - w.double().cpu()).abs()
        if diff.numel() == 0:
            continue
        if torch.isnan(diff).any():
            raise AssertionError(f"position {i}: NaN where the reference has none")
        worst = max(worst, float(diff.max()) / (_eps(g.dtype) * max(scale, 1e-30)))
    return worst


class Runner:
    def __init__(self, device: torch.device, tolerance_ulps: float):
        self.device = device
        self.tolerance = tolerance_ulps
        self.results: List[Tuple[str, str, str, str]] = []  # backend, call, status, detail

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self, backend: str, name: str, inputs: List[List[Tensor]], written: Sequence[int],
              call: Callable[[List[List[Tensor]]], Optional[Tensor]], scale: float) -> None:
        """Run ``call`` on ``inputs`` under ``backend`` and on a copy under reference; compare the written lists."""
        ref_inputs = _clone(inputs)
        t0 = time.perf_counter()
        try:
            with swm_fused.use_backend(backend):
                got = call(inputs)
            self.sync()
            with swm_fused.use_backend("reference"):
                want = call(ref_inputs)
            self.sync()
            worst = 0.0
            for j in written:
                worst = max(worst, _compare(inputs[j], ref_inputs[j], scale))
            if got is not None:
                worst = max(worst, _compare([got], [want], 1.0))
        except Exception as exc:  # record and go on: one broken op must not hide the others
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
            self.results.append((backend, name, "FAIL", detail))
            print(f"  {backend:<10} {name:<28} FAIL  {detail}", flush=True)
            return
        ms = (time.perf_counter() - t0) * 1e3
        status = "ok" if worst <= self.tolerance else "FAIL"
        detail = f"max err {worst:.2f} ulp-scaled ({ms:.0f} ms)"
        self.results.append((backend, name, status, detail))
        print(f"  {backend:<10} {name:<28} {status:<4}  {detail}", flush=True)

    def run_backend(self, backend: str) -> None:
        dev = self.device
        seed = 0

        def fresh(n_lists, dtypes, positive=()):
            nonlocal seed
            seed += 1
            return _lists(dev, seed, n_lists, dtypes, positive)

        # EMA / SWA: avg (written, mixed average dtypes) and src (mixed source dtypes).
        for name, call in [
            ("ema_", lambda ls: swm_fused.ema_(ls[0], ls[1], 0.9)),
            ("ema_ found_inf=0", lambda ls: swm_fused.ema_(ls[0], ls[1], 0.75,
                                                          found_inf=swm_fused.any_nonfinite(ls[1]))),
            ("swa_ n=3", lambda ls: swm_fused.swa_(ls[0], ls[1], 3)),
            ("swa_ n=tensor", lambda ls: swm_fused.swa_(ls[0], ls[1], torch.tensor(4, device=dev))),
        ]:
            avg, src = fresh(1, AVERAGE_DTYPES)[0], fresh(1, SOURCE_DTYPES)[0]
            self.check(backend, name, [avg, src], [0], call, _max_abs(avg + src))

        # found_inf set: nothing may change.
        avg, src = fresh(1, AVERAGE_DTYPES)[0], fresh(1, SOURCE_DTYPES)[0]
        self.check(backend, "ema_ found_inf=1", [avg, src], [0],
                   lambda ls: swm_fused.ema_(ls[0], ls[1], 0.5, found_inf=torch.ones((), device=dev)), 1.0)

        # SWAG: mean and sq_mean written (sq_mean non-negative), src mixed.
        for name, n in [("swag_ n=2", 2), ("swag_ n=tensor", None)]:
            mean, sq = fresh(1, AVERAGE_DTYPES)[0], fresh(1, AVERAGE_DTYPES[::-1], positive=(True,))[0]
            src = fresh(1, SOURCE_DTYPES)[0]
            count = n if n is not None else torch.tensor(5, device=dev)
            scale = max(_max_abs(mean + src), _max_abs(sq), _max_abs(src) ** 2)
            self.check(backend, name, [mean, sq, src], [0, 1],
                       lambda ls, count=count: swm_fused.swag_(ls[0], ls[1], ls[2], count), scale)

        # K-way merges: out (written) and K inputs of mixed dtypes; one merge in place (out is inputs[0]).
        for k in MERGE_KS:
            lists = fresh(k + 1, AVERAGE_DTYPES)
            weights = [(-1) ** i * (0.5 + 0.25 * i) / k for i in range(k)]
            scale = _max_abs([t for ts in lists[1:] for t in ts]) * sum(abs(w) for w in weights)
            self.check(backend, f"merge_ K={k}", lists, [0],
                       lambda ls, w=weights: swm_fused.merge_(ls[0], ls[1:], w), scale)
        lists = fresh(3, AVERAGE_DTYPES[:1])  # in place needs out and inputs[0] to be the same tensors
        self.check(backend, "merge_ K=3 in place", lists, [0],
                   lambda ls: swm_fused.merge_(ls[0], [ls[0], ls[1], ls[2]], [0.5, 0.3, 0.2]),
                   _max_abs([t for ts in lists for t in ts]))

        # The sparsifying merges: ties_merge_ (out, base, K models; bands; each election) and dare_drop_
        # (a number or per-element keep probabilities). K = 11: the CUDA kernel's pointer table.
        for k, majority in ((1, "sum"), (3, "count"), (8, None), (11, "sum")):
            lists = fresh(k + 2, AVERAGE_DTYPES)  # out, base, then the K models
            bands = torch.rand(k, len(SHAPES), 2, dtype=torch.float64, device=dev) * torch.tensor(
                [0.5, 4.0], dtype=torch.float64, device=dev)
            weights = [(-1) ** i * (0.5 + 0.25 * i) / k for i in range(k)]
            scale = _max_abs([t for ts in lists[1:] for t in ts]) * (1 + 2 * sum(abs(w) for w in weights))
            self.check(backend, f"ties_merge_ K={k} {majority}", lists, [0],
                       lambda ls, w=weights, b=bands, m=majority: swm_fused.ties_merge_(
                           ls[0], ls[2:], w, base=ls[1], thresholds=b, majority_sign=m), scale)
        for per_element in (False, True):
            deltas, u, p = fresh(1, AVERAGE_DTYPES)[0], fresh(1, SOURCE_DTYPES, positive=(True,))[0], \
                fresh(1, [torch.float64], positive=(True,))[0]
            self.check(backend, f"dare_drop_ {'per element' if per_element else 'p=0.4'}", [deltas, u, p], [0],
                       lambda ls, e=per_element: swm_fused.dare_drop_(ls[0], ls[1], ls[2] if e else 0.4),
                       _max_abs(deltas) / 0.4 if not per_element else _max_abs(deltas) * 50)

        # any_nonfinite: finite lists, then one NaN and one Inf in the last (largest) tensor.
        lists = fresh(1, SOURCE_DTYPES)
        self.check(backend, "any_nonfinite finite", lists, [], lambda ls: swm_fused.any_nonfinite(ls[0]), 1.0)
        for bad in (float("nan"), float("inf")):
            lists = fresh(1, SOURCE_DTYPES)
            lists[0][-1].view(-1)[-1] = bad
            self.check(backend, f"any_nonfinite {bad}", lists, [], lambda ls: swm_fused.any_nonfinite(ls[0]), 1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default): the cuda and triton backends; cpu: cpp and reference (dry run)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to force, in turn (default: cuda triton on cuda, cpp reference on cpu)")
    parser.add_argument("--tolerance", type=float, default=16.0,
                        help="largest error vs the reference, in eps(out dtype) x the inputs' magnitude (default 16)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"sanitize_ops: no CUDA device (torch {torch.__version__}); use --device cpu for a dry run",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    backends = args.backends or list(DEFAULT_BACKENDS[args.device])
    print(f"sanitize_ops: torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", available backends: {', '.join(swm_fused.available_backends())}", flush=True)
    runner = Runner(device, args.tolerance)
    missing = []
    for backend in backends:
        if backend not in swm_fused.available_backends():
            missing.append(backend)
            print(f"  {backend:<10} {'(all ops)':<28} FAIL  backend unavailable", flush=True)
            continue
        print(f"backend {backend}:", flush=True)
        runner.run_backend(backend)
    failed = [r for r in runner.results if r[2] != "ok"]
    print(f"sanitize_ops: {len(runner.results)} calls, {len(runner.results) - len(failed)} ok, {len(failed)} failed"
          + (f"; backends unavailable: {', '.join(missing)}" if missing else ""), flush=True)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
