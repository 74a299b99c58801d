"""Drop-ins for the training stacks people already use: Lightning, the Hugging Face Trainer, timm and diffusers.

Each submodule imports its framework when it is imported itself, never before, so ``import swm_fused``
stays free of them. A missing framework raises an ``ImportError`` that names the pip extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


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
