"""timm's real ``ModelEmaV3``, loaded from its source file without importing the ``timm`` package.

``import timm`` needs torchvision, and no torchvision wheel on the registry loads beside the CPU build
of torch these tests run on (installing one would replace torch with a multi-GB CUDA build). Yet
``timm/utils/model_ema.py`` imports only the standard library, ``torch`` and ``torch.nn``. So:
``importlib.util.find_spec("timm")`` locates the installed package without executing its
``__init__`` (``install.sh`` installs ``timm --no-deps``), and the one file is executed under a private
module name. The class that runs is timm's own code, byte for byte.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

_NAME = "_swm_fused_tests_timm_model_ema"


def timm_model_ema() -> Optional[ModuleType]:
    """timm's ``utils/model_ema.py`` as a module, or None when timm is not installed."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.find_spec("timm")  # locates the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "model_ema.py")
    if not os.path.isfile(path):
        return None
    file_spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[_NAME] = module
    file_spec.loader.exec_module(module)
    return module


def timm_version() -> str:
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


SKIP_REASON = ("timm is not installed (install.sh installs it with `pip install --no-deps timm`; "
               "only its utils/model_ema.py source is used)")
