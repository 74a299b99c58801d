"""Reconstruct post-hoc EMA profiles (EDM2) of any length from a folder of PostHocEMA snapshots, streamed.

Each requested sigma_rel is solved for least-squares weights over the snapshots taken at or before
the target time (docs/posthoc.md), then the snapshots are merged tensor by tensor with those weights
by swm_fused.merge.merge_files (float32 accumulation, peak memory about (K+1) times the largest
tensor), into OUT_DIR/ema-sigma{SIGMA}-t{T}.safetensors. Each output's metadata records the post-hoc
facts (swm_fused.phema.*: sigma_rel, gamma, t, the time unit, the snapshots used and their
coefficients) beside merge_files' own. Everything is checked before anything is written: a
sigma_rel out of range is a usage error (exit 2); fewer than two distinct profiles, a target time
no snapshot was taken at, or snapshots of different models exit 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import sigterm_unwinds
from .merge import DTYPE_NAMES, SHORT_DTYPE_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  swm-fused phema snapshots/ --sigma-rel 0.05 0.08 0.12 -o ema/\n"
                     "  swm-fused phema snapshots/ --sigma-rel 0.1 -o ema/ --at 50000 --dtype fp32")
    parser.add_argument("snapshot_dir", metavar="SNAPSHOT_DIR", help="folder of PostHocEMA snapshots")
    parser.add_argument("--sigma-rel", nargs="+", type=float, required=True, metavar="S",
                        help="relative EMA widths to reconstruct, each in (0, 0.288675]")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                        help="output folder (created if needed): one ema-sigma{S}-t{T}.safetensors per S")
    parser.add_argument("--at", type=int, default=None, metavar="T",
                        help="target time (steps or samples, as the snapshots count it); a snapshot must have "
                             "been taken at T (default: the last snapshot)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES, key=lambda n: (n not in SHORT_DTYPE_NAMES, n)),
                        metavar="DTYPE", help=f"dtype of the outputs: {', '.join(SHORT_DTYPE_NAMES)} "
                                              "(default: the snapshots')")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")



def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .merge import merge_files
    from .posthoc import plan_reconstruction, read_snapshots, reconstruction_metadata, sigma_rel_to_gamma

    parser = args._parser
    sigma_rels = list(dict.fromkeys(args.sigma_rel))
    for s in sigma_rels:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as exc:
            parser.error(f"--sigma-rel: {exc}")
    if args.at is not None and args.at <= 0:
        parser.error(f"--at must be > 0, got {args.at}")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    snapshots = read_snapshots(args.snapshot_dir)
    plans = [(s, *plan_reconstruction(snapshots, s, args.at)) for s in sigma_rels]  # every check before writing
    with sigterm_unwinds():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tqdm(plans, desc="post-hoc EMA", unit="profile", file=sys.stderr,
                      disable=None if args.progress is None else not args.progress) as bar:
                for sigma_rel, paths, weights, t_star in bar:
                    out = out_dir / f"ema-sigma{sigma_rel!r}-t{t_star}.safetensors"
                    merge_files(paths, out, weights, normalize=False, dtype=args.dtype, progress=args.progress,
                                metadata=reconstruction_metadata(snapshots, sigma_rel, paths, weights, t_star))
                    print(f"sigma_rel {sigma_rel}: {len(paths)} snapshots -> {out}")
        except KeyboardInterrupt:
            print("swm-fused phema: interrupted; the profile being written was not", file=sys.stderr)
            return 130
    return 0
