"""Merge K checkpoints into one safetensors file or folder, tensor by tensor, with any merge method.

Methods: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
della_linear, model_stock, slerp (docs/merge_methods.md), from flags or a mergekit-style YAML config.
Inputs may be .safetensors files, torch checkpoints (.pt/.pth/.bin/.ckpt) or checkpoint folders
(model.safetensors, or shards with model.safetensors.index.json). The output is written atomically,
with the merge recorded in its metadata; peak memory is about (K+1) times the largest tensor.
Choices and rules come from swm_fused.merge: a bad method, parameter or combination is a usage
error (exit 2), a bad input file exits 1; either way nothing is written.
"""
from __future__ import annotations

import argparse
import sys

from .cli import sigterm_unwinds
from .merge import DTYPE_NAMES, MAJORITY_SIGNS, METHOD_ALIASES, METHODS, RESCALES, SHORT_DTYPE_NAMES

# Flags that describe the merge itself: with --config they come from the file instead.
_MERGE_FLAGS = ("inputs", "method", "base", "weights", "density", "gamma", "epsilon", "lambda_", "t", "normalize",
                "majority_sign", "rescale", "filter_wise", "dtype")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  swm-fused merge run1.safetensors run2.safetensors run3.safetensors -o soup.safetensors\n"
                     "  swm-fused merge a.pt b.pt -o ab.safetensors --weights 0.7 0.3 --dtype bf16\n"
                     "  swm-fused merge math/ code/ -o tasks.safetensors --method task_arithmetic "
                     "--base base/ --weights 0.5 0.5\n"
                     "  swm-fused merge math/ code/ -o merged/ --method ties --density 0.5 --base base/\n"
                     "  swm-fused merge a/ b/ -o mid/ --method slerp --t 0 0.5 0.3 0.7 1\n"
                     "  swm-fused merge --config merge.yml -o merged/")
    parser.add_argument("inputs", nargs="*", metavar="IN",
                        help="checkpoints to merge: .safetensors, .pt/.pth/.bin/.ckpt, or a folder "
                             "(model.safetensors, or shards with model.safetensors.index.json)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output: a .safetensors file (replaced if it exists), or a new or empty folder, which "
                             "keeps the shards of a sharded reference input (the base, else the first IN)")
    parser.add_argument("--config", metavar="YAML",
                        help="a mergekit-style merge config (merge_method, base_model, models, parameters, dtype); "
                             "replaces IN and the merge flags")
    parser.add_argument("--method", choices=METHODS + tuple(METHOD_ALIASES), default=None, metavar="METHOD",
                        help=f"one of {', '.join(METHODS)} (default: linear)")
    parser.add_argument("--base", metavar="BASE", help="base checkpoint, for every method but linear "
                                                       "(slerp: the t = 0 end)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one weight per input (linear: default uniform, scaled to sum 1; task_arithmetic: the "
                             "lambdas, required; others: default 1)")
    parser.add_argument("--density", nargs="+", type=float, metavar="D",
                        help="fraction of each task vector kept, in (0, 1]: one for all inputs or one per input")
    parser.add_argument("--gamma", nargs="+", type=float, metavar="G",
                        help="breadcrumbs: fraction of the largest entries dropped (default 0.01)")
    parser.add_argument("--epsilon", nargs="+", type=float, metavar="E",
                        help="della: spread of the keep probabilities, density +- epsilon (default 0.15)")
    parser.add_argument("--lambda", dest="lambda_", type=float, metavar="L",
                        help="scale of the mixed task vector: BASE + L * mixed (default 1)")
    parser.add_argument("--t", nargs="+", type=float, metavar="T",
                        help="slerp: interpolation point in [0, 1]; several values form a gradient over the layers")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="divide by the sum of the weights (default: the method's; linear and ties normalize)")
    parser.add_argument("--majority-sign", choices=MAJORITY_SIGNS, default=None,
                        help="TIES sign election: sign of the weighted sum (sum, default) or majority of signs")
    parser.add_argument("--rescale", choices=RESCALES, default=None,
                        help="dare/della: divide kept entries by their keep probability (density, default), match "
                             "the L1 norm (l1), or not (none)")
    parser.add_argument("--filter-wise", action="store_const", const=True, default=None,
                        help="model_stock: one ratio per output row instead of per tensor")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="seed of dare/della's random draws (default: random, recorded in the output)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES, key=lambda n: (n not in SHORT_DTYPE_NAMES, n)),
                        metavar="DTYPE",
                        help=f"dtype of the merged floating tensors: {', '.join(SHORT_DTYPE_NAMES)} (default: the "
                             "reference input's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the arithmetic runs (default: cpu)")



def _per_model(values):
    """One value for every input, or one per input (the library checks the count)."""
    return None if values is None else values[0] if len(values) == 1 else list(values)


def run(args: argparse.Namespace) -> int:
    """Merge; parameter errors become usage errors (exit 2), bad input raises for cli.main (exit 1)."""
    parser = args._parser
    from .merge import MergeParameterError, merge_config, merge_files

    if args.config is not None:
        given = [name for name in _MERGE_FLAGS if getattr(args, name) not in (None, [])]
        if given:
            flags = ", ".join("IN" if n == "inputs" else "--" + n.rstrip("_").replace("_", "-") for n in given)
            parser.error(f"--config describes the whole merge; drop {flags} (put them in the config)")
    elif not args.inputs:
        parser.error("give the checkpoints to merge (IN ...) or a config (--config YAML)")

    with sigterm_unwinds():
        try:
            if args.config is not None:
                merge_config(args.config, args.output, device=args.device, seed=args.seed)
            else:
                params = {"density": _per_model(args.density), "gamma": _per_model(args.gamma),
                          "epsilon": _per_model(args.epsilon), "lambda_": args.lambda_,
                          "t": None if args.t is None else args.t[0] if len(args.t) == 1 else list(args.t),
                          "majority_sign": args.majority_sign, "rescale": args.rescale, "filter_wise": args.filter_wise}
                merge_files(args.inputs, args.output, args.weights, dtype=args.dtype, device=args.device,
                            normalize=args.normalize, method=args.method or "linear", base=args.base, seed=args.seed,
                            **{k: v for k, v in params.items() if v is not None})
        except MergeParameterError as exc:
            parser.error(str(exc))
        except KeyboardInterrupt:
            print("swm-fused merge: interrupted; no output written", file=sys.stderr)
            return 130
    return 0
