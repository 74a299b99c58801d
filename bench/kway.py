"""The K-way linear merge against the copy ceiling and the torch loop, measured in interleaved rounds.

    PYTHONPATH=$PWD python bench/kway.py [--k 2 3 8] [--rounds 15] [--quick] [--json FILE]

Each round times, one after the other on the same machine state: the copy ceiling (the in-place
``add_`` of two 64M-element fp32 tensors that ``conftest.copy_gbps`` uses, 12 B/elem), the torch
loop (``mul`` + K-1 ``_foreach_add_``) and ``swm_fused.merge_`` on the cpp backend, both on the
GPT-2-small-like list (124,439,808 fp32 params in 148 tensors per model, K distinct models). The
figure of merit is the median over rounds of each round's ratio (ours / copy, ours / torch): a
loaded machine moves the bandwidth of all three together, so per-round ratios are far steadier than
ratios of separate medians.

Bytes credited (docs/design.md): the merge K reads + 1 write of 4 bytes per element, 4(K+1), for
every provider; the copy ceiling 12 (two reads, one write). The copy moves what it is credited
with (its write goes to lines it has just read); a merge into a separate output moves 4 more
bytes per element unless its stores skip the cache (write-allocate reads the output line first).

``bench/test_bench_ops.py::test_merge_interleaved`` runs the same rounds under pytest-benchmark.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cases import Case, build_data, copy_ceiling, providers, workload_shapes

CPU = torch.device("cpu")
QUICK_COPY_NUMEL = 1 << 22  # --quick: a 16 MB copy, so the smoke run stays quick (its numbers mean nothing)
NAMES = ("copy", "torch:loop", "swm:cpp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Interleaved:
    """Seconds per call of each provider, round by round (index r of every list is round r)."""

    k: int
    numel: int
    merge_bytes: int  # credited to one merge call, 4(K+1) per element
    copy_bytes: int  # credited to one copy call, 12 per element
    seconds: Dict[str, List[float]] = field(default_factory=lambda: {n: [] for n in NAMES})

    def gbps(self, name: str, r: int) -> float:
        nbytes = self.copy_bytes if name == "copy" else self.merge_bytes
        return nbytes / self.seconds[name][r] / 1e9

    def median_gbps(self, name: str) -> float:
        return statistics.median(self.gbps(name, r) for r in range(self.rounds))

    def median_ratio(self, num: str, den: str) -> float:
        """Median over rounds of (GB/s of ``num``) / (GB/s of ``den``) in the same round."""
        return statistics.median(self.gbps(num, r) / self.gbps(den, r) for r in range(self.rounds))

    @property
    def rounds(self) -> int:
        return min(len(v) for v in self.seconds.values())

    def summary(self) -> Dict[str, float]:
        return {
            "k": self.k, "rounds": self.rounds,
            "copy_gbps": self.median_gbps("copy"), "torch_gbps": self.median_gbps("torch:loop"),
            "ours_gbps": self.median_gbps("swm:cpp"),
            "ours_over_copy": self.median_ratio("swm:cpp", "copy"),
            "torch_over_copy": self.median_ratio("torch:loop", "copy"),
            "ours_over_torch": self.median_ratio("swm:cpp", "torch:loop"),
        }


class Rounds:
    """The three calls of one K; ``others()`` times the copy and the torch loop (one round's first part),
    ``ours()`` is the merge: pytest-benchmark times it, or ``run`` does."""

    def __init__(self, k: int, quick: bool = False, seed: int = 0, clock: Callable[[], float] = time.perf_counter,
                 dtype: torch.dtype = torch.float32):
        self.clock = clock
        self.case = Case("merge", "gpt2", dtype, k)
        shapes = workload_shapes("gpt2", quick)
        self.data = build_data(self.case, shapes, CPU, seed=seed)
        self.copy, copy_bytes, self.copy_description = copy_ceiling(CPU, QUICK_COPY_NUMEL if quick else 1 << 26)
        by_name = {p.name: p for p in providers("cpu")}
        self.torch_loop = by_name["torch:loop"].prepare(self.case, self.data)
        self.ours = by_name["swm:cpp"].prepare(self.case, self.data)
        self.result = Interleaved(k, self.data.numel, self.data.nbytes, copy_bytes)
        for call in (self.copy, self.torch_loop, self.ours):  # warm-up: pages touched, threads started
            call()

    def others(self) -> None:
        for name, call in (("copy", self.copy), ("torch:loop", self.torch_loop)):
            start = self.clock()
            call()
            self.result.seconds[name].append(self.clock() - start)

    def run(self, rounds: int) -> Interleaved:
        for _ in range(rounds):
            self.others()
            start = self.clock()
            self.ours()
            self.result.seconds["swm:cpp"].append(self.clock() - start)
        return self.result


def markdown(results: Sequence[Interleaved]) -> str:
    rows = ["| K | rounds | copy GB/s | torch:loop GB/s | swm:cpp GB/s | ours / copy | torch / copy | ours / torch |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r.summary()
        rows.append(f"| {r.k} | {s['rounds']} | {s['copy_gbps']:.1f} | {s['torch_gbps']:.1f} | {s['ours_gbps']:.1f} | "
                    f"{100 * s['ours_over_copy']:.0f}% | {100 * s['torch_over_copy']:.0f}% | "
                    f"{s['ours_over_torch']:.2f}x |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a few small tensors: a smoke run, numbers mean nothing")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the models' and the output's dtype (bf16: 2(K+1) bytes per element)")
    parser.add_argument("--json", help="write every round's seconds here")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: the calling thread's CPU time (needs --threads 1); on a loaded machine it "
                             "leaves out the time the thread waits for a core")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread needs --threads 1: other threads' time would be left out")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    results = []
    for k in args.k:
        rounds = Rounds(k, quick=args.quick, clock=clock, dtype=DTYPES[args.dtype])
        results.append(rounds.run(args.rounds))
        del rounds
        gc.collect()
        print(markdown(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; GPT-2-small-like list, {args.dtype}; "
          f"copy: in-place add_ of two {QUICK_COPY_NUMEL >> 20 if args.quick else 64}M-element fp32 tensors")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"summary": r.summary()} for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    sys.exit(main())
