"""Drop-ins for the training stacks people already use: Lightning, the Hugging Face Trainer, timm and diffusers.

Each submodule imports its framework when it is imported itself, never before, so ``import swm_fused``
stays free of them. A missing framework raises an ``ImportError`` that names the pip extra to install.
"""
from __future__ import annotations

import importlib
import numbers
from types import ModuleType
from typing import Any

__all__ = ["require", "check_number", "check_int"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` for an integration, or raise an ``ImportError`` that says how to install it.

    Args:
        module: the framework's import name, e.g. ``"lightning.pytorch"``.
        extra: the swm_fused extra that installs it, e.g. ``"lightning"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this swm_fused integration needs {module!r}, which did not import ({error}); "
                          f"install it with: pip install 'swm_fused[{extra}]'") from error


def check_number(what: str, name: str, value: Any, low: float, high: float, *, strict_low: bool = False) -> None:
    """A real number in ``[low, high]`` (``(low, high]`` with ``strict_low``): TypeError for another type,
    ValueError for a value outside, both naming ``what`` (the front-end) and the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}: {name} must be a number, got {type(value).__name__}")
    if not (value > low if strict_low else value >= low) or not value <= high:
        raise ValueError(f"{what}: {name} must be in {'(' if strict_low else '['}{low}, {high}], got {value!r}")


def check_int(what: str, name: str, value: Any, low: int, allow_none: bool = False) -> None:
    """An int ``>= low`` (or None with ``allow_none``): TypeError for another type (bool included), ValueError
    below ``low``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}: {name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{what}: {name} must be >= {low}, got {value}")
