"""Builds swm_fused._C: the op schemas, the validator and the C++ CPU kernels always (every backend
needs the validator), the CUDA kernels when a CUDA toolkit and a CUDA torch exist.

SWM_FUSED_NO_CUDA=1 skips CUDA. SWM_FUSED_CPU_ARCH sets the -march of the CPU kernels (default: native;
use e.g. x86-64-v3 for portable wheels).
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

with_cuda = (os.environ.get("SWM_FUSED_NO_CUDA") != "1" and torch.version.cuda is not None
             and CUDA_HOME is not None)
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
arch = os.environ.get("SWM_FUSED_CPU_ARCH", "native")
# No fp contraction: the kernels write their fmas explicitly (lerp, as torch does) and keep
# merge's multiply and add separate (as torch does), so results don't depend on the compiler.
cxx_flags = ["-O3", "-g0", "-std=c++20", f"-march={arch}", "-ffp-contract=off", "-fopenmp"]
extra_compile_args = {"cxx": cxx_flags}
define_macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    extra_compile_args["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]  # no fast-math: it flushes subnormals
    define_macros.append(("SWM_FUSED_WITH_CUDA", None))
Extension = CUDAExtension if with_cuda else CppExtension
extension = Extension("swm_fused._C", sources, include_dirs=[os.path.abspath("csrc")],
                      extra_compile_args=extra_compile_args, extra_link_args=["-fopenmp"],
                      define_macros=define_macros, py_limited_api=True)

setup(
    name="swm_fused",
    version="0.1.0",
    description="Fused, in-place weight averaging (SWA, EMA, SWAG) and K-way model merging for PyTorch",
    packages=find_packages(include=["swm_fused", "swm_fused.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "numpy", "tqdm", "safetensors", "pyyaml"],
    extras_require={
        "triton": ["triton>=3.1"],
        "demo": ["scikit-learn"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "expecttest", "matplotlib", "pyyaml"],
        "lightning": ["lightning>=2.6"],
        "transformers": ["transformers>=4.40", "accelerate>=0.30"],
        "diffusers": ["diffusers>=0.27"],
        # ours needs no timm; timm's own torchvision pin would replace a CPU torch (install.sh installs timm --no-deps)
        "timm": [],
        "all": ["triton>=3.1", "scikit-learn", "pytest", "pytest-benchmark", "expecttest", "matplotlib", "pyyaml",
                "lightning>=2.6", "transformers>=4.40", "accelerate>=0.30", "diffusers>=0.27"],
    },
    entry_points={"console_scripts": ["swm-fused=swm_fused.cli:main"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
