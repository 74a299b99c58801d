"""swm_fused: fused, in-place weight averaging (SWA, EMA, SWAG) and K-way model merging for PyTorch."""
from __future__ import annotations

import importlib
from typing import Any

from .dispatch import available_backends, tune, use_backend
from .flat import FlatBuffer
from .ops import (BoundLists, any_nonfinite, dare_drop_, ema_, ema_multi_, merge_, sam_ascent_, sq_norm, swa_, swag_,
                  ties_merge_)

__version__ = "0.1.0"

# Higher layers load on first use, so `import swm_fused` stays cheap.
_LAZY = {
    "WeightAverager": "swm_fused.averager",
    "EMAWarmup": "swm_fused.averager",
    "AveragingEngine": "swm_fused.engine",
    "PostHocEMA": "swm_fused.posthoc",
    "posthoc": "swm_fused.posthoc",
    "flatten_parameters": "swm_fused.engine",
    "engine": "swm_fused.engine",
    "SWAG": "swm_fused.swag",
    "swa_utils": "swm_fused.swa_utils",
    "optim": "swm_fused.optim",
    "merge": "swm_fused.merge",
    "swm": "swm_fused.swm",
    "swag": "swm_fused.swag",
    "distributed": "swm_fused.distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'swm_fused' has no attribute {name!r}")


__all__ = ["ema_", "ema_multi_", "swa_", "swag_", "merge_", "any_nonfinite", "sq_norm", "sam_ascent_", "ties_merge_",
           "dare_drop_", "FlatBuffer", "BoundLists", "available_backends", "use_backend", "tune", *_LAZY]
