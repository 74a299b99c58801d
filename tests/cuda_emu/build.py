"""Build swm_fused's CUDA sources for the host, through the emulation layer in tests/cuda_emu/include.

What is compiled, unchanged except for one textual rewrite:

* every ``csrc/cuda/*.cu`` file (and ``multi_tensor_apply.cuh``, which they include) as C++ with
  ``-D__CUDACC__ -include cuda_emu.h``; the shim headers (cuda_runtime*.h, cuda_fp16.h, cuda_bf16.h)
  come first on the include path. No torch header is on their include path, as under nvcc.
* every ``csrc/cuda/*.cpp`` file (the bindings) against the CPU torch, with shims for
  ``c10/cuda/*.h`` and ``-include torch_library_redirect.h``, which turns
  ``TORCH_LIBRARY_IMPL(swm_fused, CUDA, m)`` into CPU kernels of the ``swm_fused_emu`` library.
* ``glue.cpp`` (ours): the ``swm_fused_emu`` schemas, copied from the ``TORCH_LIBRARY(swm_fused, m)``
  block of ``csrc/ops.cpp``, plus self-test ops for the emulation layer.

The only rewrite (:func:`rewrite_launches`), applied to the copies in the build directory:
``<<<`` becomes `` | ::cuda_emu::launch_config(`` and the matching ``>>>`` becomes
``) | ::cuda_emu::launch_args``, so ``k<<<g, b, s, st>>>(a, b)`` reads
``k | ::cuda_emu::launch_config(g, b, s, st) | ::cuda_emu::launch_args(a, b)``.

The result, ``build/cuda_emu/<hash>/libswm_fused_emu.so``, is cached by a hash of every input
(sources, emulation files, flags, compiler and torch versions), so a rerun is a lookup.
Environment: ``SWM_FUSED_EMU_CSRC`` builds another copy of csrc/ (used to inject bugs without
touching csrc/), ``SWM_FUSED_EMU_JOBS`` sets parallel compiles (default 2), ``CXX`` the compiler.

Run ``python tests/cuda_emu/build.py`` to build and print the library path.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INCLUDE = HERE / "include"
GLUE = HERE / "glue.cpp"
RUNTIME = HERE / "runtime.cpp"    # fibers, scheduler, barriers (the non-template part of cuda_emu.h)
SELFTEST = HERE / "selftest.cu"   # test-only kernels for the emulation itself
LIB_NAME = "libswm_fused_emu.so"

# -ffp-contract=off: the kernels round every product and sum explicitly (__fmul_rn, __fadd_rn, fma), so
# the host compiler must not fuse a*b+c. -fno-strict-aliasing: the kernels move data through
# reinterpret_cast'ed Vec<T, N> pointers, as CUDA code does.
COMMON_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-fvisibility=default",
                "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function"]


class BuildError(RuntimeError):
    """The emulated build failed; the message holds the failing command and its output."""


def find_compiler() -> Optional[str]:
    """The host C++ compiler: $CXX, else c++ or g++ on PATH; None when there is none."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
    return None


def csrc_dir() -> Path:
    return Path(os.environ.get("SWM_FUSED_EMU_CSRC", REPO / "csrc")).resolve()


_LAUNCH = re.compile(r"<<<((?:(?!>>>).)*?)>>>", re.DOTALL)


def rewrite_launches(text: str) -> Tuple[str, int]:
    """``k<<<cfg>>>(args)`` -> ``k | ::cuda_emu::launch_config(cfg) | ::cuda_emu::launch_args(args)``.

    Purely textual: only the ``<<<`` and ``>>>`` tokens of a launch are replaced; every other byte is kept.
    Returns the new text and the number of launches rewritten.
    """
    new, count = _LAUNCH.subn(r" | ::cuda_emu::launch_config(\1) | ::cuda_emu::launch_args", text)
    if "<<<" in new:
        raise BuildError("a '<<<' without a matching '>>>' is left after rewriting launches")
    return new, count


def extract_schemas(ops_cpp: str) -> str:
    """The body of ``TORCH_LIBRARY(swm_fused, m) { ... }`` in csrc/ops.cpp (its m.def calls)."""
    match = re.search(r"TORCH_LIBRARY\(\s*swm_fused\s*,\s*m\s*\)\s*\{", ops_cpp)
    if not match:
        raise BuildError("csrc/ops.cpp has no TORCH_LIBRARY(swm_fused, m) block")
    depth, i = 1, match.end()
    while depth:
        if i >= len(ops_cpp):
            raise BuildError("unbalanced braces in csrc/ops.cpp's TORCH_LIBRARY block")
        depth += {"{": 1, "}": -1}.get(ops_cpp[i], 0)
        i += 1
    return ops_cpp[match.end():i - 1].strip() + "\n"


def _torch_paths() -> Tuple[List[str], List[str], bool, str]:
    import torch
    from torch.utils import cpp_extension
    return (cpp_extension.include_paths(), cpp_extension.library_paths(), torch.compiled_with_cxx11_abi(),
            torch.__version__)


def _inputs(src: Path) -> List[Path]:
    files = sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += sorted(p for p in INCLUDE.rglob("*") if p.is_file())
    return files + [GLUE, RUNTIME, SELFTEST, Path(__file__).resolve()]


def _hash(cxx: str, src: Path, extra: Sequence[str]) -> str:
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for item in [cxx, version, *COMMON_FLAGS, *extra]:
        h.update(item.encode() + b"\0")
    for path in _inputs(src):
        h.update(str(path.relative_to(src) if path.is_relative_to(src) else path.relative_to(HERE)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: List[str], log: List[str]) -> None:
    log.append("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout or proc.stderr:
        log.append(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def build(force: bool = False, jobs: Optional[int] = None, verbose: bool = False) -> Path:
    """Build (or find in the cache) the emulated library; return its path. Raises BuildError."""
    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no host C++ compiler (set CXX, or install g++)")
    src = csrc_dir()
    cuda_src = src / "cuda"
    if not cuda_src.is_dir():
        raise BuildError(f"{cuda_src} does not exist")
    torch_includes, torch_libs, cxx11_abi, torch_version = _torch_paths()
    abi_flag = f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}"
    key = _hash(cxx, src, [abi_flag, torch_version, *torch_includes])
    # One cache folder per csrc tree, so a build of a scratch copy never evicts the repo's own.
    same = src == (REPO / "csrc").resolve()
    root = REPO / "build" / "cuda_emu" / ("csrc" if same else "alt-" + hashlib.sha256(str(src).encode()).hexdigest()[:8])
    out_dir = root / key
    lib = out_dir / LIB_NAME
    if lib.exists() and not force:
        return lib

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f"tmp-{key}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(src, stage / "src", ignore=shutil.ignore_patterns("__pycache__"))
    log: List[str] = [f"csrc: {src}"]
    launches = 0
    for path in sorted((stage / "src" / "cuda").glob("*")):
        if path.suffix in (".cu", ".cuh"):
            text, count = rewrite_launches(path.read_text())
            path.write_text(text)
            launches += count
            log.append(f"rewrote {count} launch(es) in {path.name}")
    if launches == 0:
        raise BuildError(f"no kernel launch found in {cuda_src} (nothing would run)")
    gen = stage / "gen"
    gen.mkdir()
    selftest_text, selftest_launches = rewrite_launches(SELFTEST.read_text())
    (gen / SELFTEST.name).write_text(selftest_text)
    log.append(f"rewrote {selftest_launches} launch(es) in {SELFTEST.name}")
    (gen / "schemas.inc").write_text(extract_schemas((src / "ops.cpp").read_text()))

    base = [cxx, *COMMON_FLAGS, abi_flag, "-I", str(INCLUDE)]
    torch_inc = [flag for path in torch_includes for flag in ("-isystem", path)]
    units: List[Tuple[Path, List[str]]] = []
    for cu in sorted((stage / "src" / "cuda").glob("*.cu")) + [gen / SELFTEST.name]:
        units.append((cu, base + ["-x", "c++", "-D__CUDACC__", "-include", "cuda_emu.h"]))
    for cpp in sorted((stage / "src" / "cuda").glob("*.cpp")):
        units.append((cpp, base + ["-include", "torch_library_redirect.h", *torch_inc]))
    units.append((GLUE, base + ["-I", str(gen), *torch_inc]))
    units.append((RUNTIME, base))
    objs = [stage / "obj" / (unit.name + ".o") for unit, _ in units]
    (stage / "obj").mkdir()
    logs: List[List[str]] = [[] for _ in units]

    def compile_unit(i: int) -> None:
        unit, flags = units[i]
        _run(flags + ["-c", str(unit), "-o", str(objs[i])], logs[i])

    workers = jobs or int(os.environ.get("SWM_FUSED_EMU_JOBS", "0") or 0) or min(2, os.cpu_count() or 1)
    # Slowest (torch-including) units first, so two jobs finish together.
    order = sorted(range(len(units)), key=lambda i: units[i][0].suffix == ".cu")
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(compile_unit, i) for i in order]:
                future.result()
        link_log: List[str] = []
        _run([cxx, "-shared", "-o", str(stage / LIB_NAME), *map(str, objs),
              *[flag for path in torch_libs for flag in ("-L", path, f"-Wl,-rpath,{path}")], "-lc10", "-ltorch_cpu"],
             link_log)
    finally:
        (stage / "build.log").write_text("\n".join(log + sum(logs, []) + (link_log if "link_log" in locals() else [])))
    (stage / "build.log").open("a").write(f"\nbuilt in {time.monotonic() - started:.1f} s\n")
    try:
        stage.rename(out_dir)
    except OSError:  # another process finished the same build first
        shutil.rmtree(stage, ignore_errors=True)
    for old in root.iterdir():  # keep the cache to the current build
        if old != out_dir and old.is_dir() and not old.name.startswith("tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    if verbose:
        print(f"built {lib} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return lib


if __name__ == "__main__":
    t0 = time.monotonic()
    print(build(force="--force" in sys.argv, verbose=True))
    print(f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
