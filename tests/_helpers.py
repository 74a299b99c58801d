"""Shared test helpers: one verbose allclose, tolerance rows, and backends under test."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

import swm_fused
from swm_fused import dispatch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# (dtype, atol, rtol) rows: how far two correct backends may differ when they store into `dtype`.
# Both compute in fp32 (fp64 for fp64) with fma-based lerp; an fp32 ulp of difference before the
# store can move a bf16/fp16 result by one ulp of that format.
BACKEND_TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
}

# How far a stored result may be from exact float64 math: rounding at the store plus fp32 arithmetic.
FLOAT64_TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str = "") -> None:
    """allclose that says where and how it failed, and treats NaN/Inf positions as data to compare."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64).flatten()
    e = expected.detach().to("cpu", torch.float64).flatten()
    problems: List[str] = []
    nan_diff = torch.isnan(a) != torch.isnan(e)
    if nan_diff.any():
        i = int(nan_diff.nonzero()[0])
        problems.append(f"NaN mismatch at {int(nan_diff.sum())} elements, first at {i}: {a[i].item()} vs {e[i].item()}")
    inf_diff = (torch.isinf(a) | torch.isinf(e)) & (a != e) & ~torch.isnan(a) & ~torch.isnan(e)
    if inf_diff.any():
        i = int(inf_diff.nonzero()[0])
        problems.append(f"Inf mismatch at {int(inf_diff.sum())} elements, first at {i}: {a[i].item()} vs {e[i].item()}")
    finite = torch.isfinite(a) & torch.isfinite(e)
    err = (a - e).abs().where(finite, torch.zeros_like(a))
    bad = err > atol + rtol * e.abs()
    if bad.any():
        i = int(bad.nonzero()[0])
        rel = (err / e.abs().clamp_min(1e-300)).where(finite, torch.zeros_like(a))
        problems.append(f"{int(bad.sum())}/{a.numel()} elements off (atol={atol}, rtol={rtol}); max abs err "
                        f"{err.max().item():.3g}, max rel err {rel.max().item():.3g}; first at {i}: "
                        f"{a[i].item()!r} vs expected {e[i].item()!r}")
    assert not problems, f"{what}: " + "; ".join(problems)


def cpu_backends() -> List[str]:
    """Backends that run on CPU tensors in this install (Triton through its interpreter)."""
    return [name for name in swm_fused.available_backends()
            if dispatch.get_backend(name).supports(torch.device("cpu"))]


def random_tensor(shape, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def clones(tensors: List[Tensor]) -> List[Tensor]:
    return [t.clone() for t in tensors]


def bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().flatten().view(torch.uint8)


def assert_unchanged(before: List[Tensor], after: List[Tensor], what: str) -> None:
    """Bitwise equality, so NaN payloads and -0.0 count too."""
    for i, (b, a) in enumerate(zip(before, after)):
        assert torch.equal(bits(b), bits(a)), f"{what}: tensor {i} was modified"
