"""Show versions, the available backends and why any backend is missing; then run a quick self-check."""
from __future__ import annotations

import argparse
import platform

import torch

from . import __version__, dispatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true", help="skip the self-check against the reference backend")


def self_check() -> list:
    """Run every op on each available CPU backend against the reference; return (backend, op, max_err) rows."""
    from . import ops
    gen = torch.Generator().manual_seed(0)
    shapes = [(4097,), (7, 3), (1,)]
    rows = []
    for name in dispatch.available_backends():
        if name == "reference" or not dispatch.get_backend(name).supports(torch.device("cpu")):
            continue
        for op in ("ema_", "swa_", "swag_", "merge_"):
            results = []
            for backend in ("reference", name):
                torch.manual_seed(1)
                avg = [torch.randn(s, generator=gen.manual_seed(2)) for s in shapes]
                sq = [torch.rand(s, generator=gen.manual_seed(3)) for s in shapes]
                src = [torch.randn(s, generator=gen.manual_seed(4), dtype=torch.float32).bfloat16() for s in shapes]
                with dispatch.use_backend(backend):
                    if op == "ema_":
                        ops.ema_(avg, src, 0.9)
                    elif op == "swa_":
                        ops.swa_(avg, src, 3)
                    elif op == "swag_":
                        ops.swag_(avg, sq, src, 3)
                    else:
                        ops.merge_(avg, [avg, src, sq], [0.5, 0.3, -0.2])
                results.append(torch.cat([t.flatten() for t in avg + sq]))
            err = (results[0] - results[1]).abs().max().item()
            rows.append((name, op, err))
    return rows


def run(args: argparse.Namespace) -> int:
    print(f"swm_fused {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    forced = dispatch.forced_backend()
    print(f"forced backend: {forced or 'none (automatic)'}")
    print("backends:")
    for name, reason in dispatch.backend_status().items():
        print(f"  {name:<10} {'available' if not reason else 'unavailable: ' + reason}")
    if args.no_check:
        return 0
    rows = self_check()
    failed = False
    print("self-check against reference (fp32 average, bf16 source, max abs diff):")
    for name, op, err in rows:
        ok = err <= 1e-5
        failed |= not ok
        print(f"  {name:<10} {op:<7} {err:.2e}  {'ok' if ok else 'MISMATCH'}")
    if not rows:
        print("  (no backend other than reference runs on CPU here)")
    return 1 if failed else 0
