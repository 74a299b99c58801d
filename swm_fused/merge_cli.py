"""Merge K checkpoint files into one safetensors file, tensor by tensor (weighted average or task arithmetic).

Inputs may be .safetensors files, torch checkpoints (.pt/.pth/.bin/.ckpt) or folders of shards
with model.safetensors.index.json. The output is written atomically, with the inputs and weights
recorded in its metadata; peak memory is about (K+1) times the largest tensor.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

# torch loads inside run(), so building the CLI parser stays cheap.

_DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  swm-fused merge run1.safetensors run2.safetensors run3.safetensors -o soup.safetensors\n"
                     "  swm-fused merge a.pt b.pt -o ab.safetensors --weights 0.7 0.3 --dtype bf16\n"
                     "  swm-fused merge math/ code/ -o tasks.safetensors --method task-arithmetic "
                     "--base base/ --weights 0.5 0.5")
    parser.add_argument("inputs", nargs="+", metavar="IN",
                        help="checkpoints to merge: .safetensors, .pt/.pth/.bin/.ckpt, or a sharded folder "
                             "with model.safetensors.index.json")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output .safetensors file (replaced if it exists; never one of the inputs)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one weight per input (default: uniform); with task-arithmetic, one lambda per "
                             "input (required)")
    parser.add_argument("--method", choices=("linear", "task-arithmetic"), default="linear",
                        help="linear: sum_k w_k * IN_k (default); task-arithmetic: "
                             "BASE + sum_k w_k * (IN_k - BASE)")
    parser.add_argument("--base", metavar="BASE", help="base checkpoint for task-arithmetic")
    parser.add_argument("--dtype", choices=_DTYPES,
                        help="dtype of the merged floating tensors (default: the first input's, or BASE's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the arithmetic runs (default: cpu)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="linear only: use the weights as given instead of scaling them to sum to 1")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like an exception, so the temporary output is removed


def run(args: argparse.Namespace) -> int:
    """Check the flag combination, then merge; bad input raises ValueError/OSError for cli.main to print."""
    parser = args._parser
    if args.method == "task-arithmetic":
        if args.base is None:
            parser.error("--method task-arithmetic requires --base BASE")
        if args.weights is None:
            parser.error("--method task-arithmetic requires --weights (one lambda per input)")
        if args.no_normalize:
            parser.error("--no-normalize applies to --method linear only "
                         "(task-arithmetic lambdas are never normalized)")
    elif args.base is not None:
        parser.error("--base is only used with --method task-arithmetic")

    from .merge import merge_files

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        merge_files(args.inputs, args.output, args.weights, dtype=args.dtype, device=args.device,
                    normalize=not args.no_normalize, method=args.method, base=args.base)
    except KeyboardInterrupt:
        print("swm-fused merge: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
