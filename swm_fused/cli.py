"""Command line: ``swm-fused`` / ``python -m swm_fused`` with subcommands info, merge, phema and demo.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Usage errors exit with 2 (argparse); bad input exits with 1
after one clear line on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from typing import Iterator, List, Optional

SUBCOMMANDS = {
    "info": ("swm_fused.info", "show the available backends and why any is missing"),
    "merge": ("swm_fused.merge_cli", "merge K checkpoints into one (linear, TIES, DARE, SLERP, ...; streamed)"),
    "phema": ("swm_fused.phema_cli", "reconstruct post-hoc EMA profiles of any length from PostHocEMA snapshots"),
    "demo": ("swm_fused.demo", "train trajectories on real data and compare SGD, EMA, SWA, SWM and ensembles"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swm-fused", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"swm-fused {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like an exception, so temporary output is removed


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Inside the block, SIGTERM raises SystemExit (in the main thread), so writers clean up as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
