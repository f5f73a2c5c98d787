"""Where the C++/CUDA extension comes from: one built at install time, else torch's JIT.

Order: the module `regdrop_fast._C` built by setup.py (`pip install --no-build-isolation .`,
`make build`); else the csrc sources compiled with torch.utils.cpp_extension.load (ninja) into a
cache directory per torch version, on first use or ahead of time with `regdrop-fast build-ext`;
else no extension, and the backends report why. REGDROP_FAST_JIT=0 turns the JIT off.

setup.py loads this file by path (torch may be absent from an isolated build environment), so
torch is imported inside the functions only and nothing here imports the package.
"""
from __future__ import annotations

import glob
import importlib
import logging
import os
import subprocess
import sys
from typing import Optional

__all__ = ["BUILD_HINT", "build_config", "cache_dir", "load", "source_dir"]

JIT_ENV = "REGDROP_FAST_JIT"
NO_CUDA_ENV = "REGDROP_FAST_NO_CUDA"
CACHE_ENV = "REGDROP_FAST_CACHE_DIR"
JIT_NAME = "regdrop_fast_C"
BUILD_HINT = (
    "run `regdrop-fast build-ext` (compiles it with torch's JIT; needs a C++ compiler and "
    "ninja), or build it at install time with `pip install --no-build-isolation .` "
    "(`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` in a "
    "source checkout) in an environment that has torch and a C++ compiler"
)
_log = logging.getLogger("regdrop_fast")
_HERE = os.path.dirname(os.path.abspath(__file__))


def source_dir() -> Optional[str]:
    """The csrc directory: shipped in the package (wheel, sdist) or beside it (source tree)."""
    for candidate in (os.path.join(_HERE, "csrc"), os.path.join(os.path.dirname(_HERE), "csrc")):
        if glob.glob(os.path.join(candidate, "*.cpp")):
            return candidate
    return None


def compiler_error() -> Optional[str]:
    """None if the C++ compiler torch's builds use ($CXX, else c++) runs, else why not."""
    cxx = os.environ.get("CXX", "c++")
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no working C++ compiler ({cxx!r}: {exc})"
    if proc.returncode != 0:
        return f"no working C++ compiler ({cxx!r} --version exited with {proc.returncode})"
    return None


def cuda_decision(torch_module) -> tuple:
    """(build the .cu files?, why or why not). A CUDA build needs a CUDA torch, nvcc and an arch
    to target: a visible GPU or TORCH_CUDA_ARCH_LIST (torch's arch detection fails without)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get(NO_CUDA_ENV, "0") == "1":
        return False, f"{NO_CUDA_ENV}=1"
    if torch_module.version.cuda is None:
        return False, "torch is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if not (os.environ.get("TORCH_CUDA_ARCH_LIST") or torch_module.cuda.is_available()):
        return False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset: no CUDA arch to target"
    return True, "CUDA torch, nvcc and a CUDA arch"


def build_config(csrc: str) -> dict:
    """Sources and flags of the extension, shared by setup.py and the JIT."""
    import torch

    cpp_sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    with_cuda, cuda_reason = cuda_decision(torch)
    with_cuda = with_cuda and bool(cuda_sources)
    # torch >= 2.10 headers use C++20; older releases (down to 2.6) build as C++17
    torch_version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if torch_version >= (2, 10) else "-std=c++17"
    macros = [("REGDROP_WITH_CUDA", "1")] if with_cuda else []
    return {
        "sources": cpp_sources + (cuda_sources if with_cuda else []),
        "with_cuda": with_cuda,
        "cuda_reason": cuda_reason,
        "include_dirs": [csrc],
        "define_macros": macros,
        "cxx_flags": ["-O3", std, "-fopenmp"],
        "nvcc_flags": ["-O3", std, "--use_fast_math", "-lineinfo"],
        "link_flags": ["-fopenmp"],
    }


def cache_dir() -> str:
    """JIT build directory: one per torch version, CUDA version and Python."""
    import torch

    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "regdrop_fast")
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, f"torch{torch.__version__.split('+')[0]}-{flavour}-{python}")


def _jit_build(verbose: bool = False):
    """Compile (or reuse the cached build of) the csrc sources with torch's JIT."""
    import torch.utils.cpp_extension as cpp_extension

    csrc = source_dir()
    if csrc is None:
        raise RuntimeError("the csrc sources are not installed with the package")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    error = compiler_error()
    if error:
        raise RuntimeError(error)
    config = build_config(csrc)
    build_dir = cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    if not glob.glob(os.path.join(build_dir, JIT_NAME + "*.so")):
        _log.warning("regdrop_fast: compiling the C++%s extension with torch's JIT into %s "
                     "(once per torch version; `regdrop-fast build-ext` does it ahead of time)",
                     "/CUDA" if config["with_cuda"] else "", build_dir)
    macro_flags = [f"-D{name}={value}" for name, value in config["define_macros"]]
    return cpp_extension.load(
        name=JIT_NAME, sources=config["sources"], build_directory=build_dir,
        extra_include_paths=config["include_dirs"],
        extra_cflags=config["cxx_flags"] + macro_flags,
        extra_cuda_cflags=config["nvcc_flags"] + macro_flags,
        extra_ldflags=config["link_flags"], with_cuda=config["with_cuda"], verbose=verbose)


def load(verbose: bool = False, force_jit: bool = False) -> tuple:
    """(module, None) or (None, why the extension is unavailable and how to get it).
    `force_jit` ignores REGDROP_FAST_JIT=0 (an explicit `regdrop-fast build-ext`)."""
    try:
        return importlib.import_module("regdrop_fast._C"), None
    except ImportError as exc:
        prebuilt_error = f"the C++ extension regdrop_fast._C is not built ({exc})"
    if os.environ.get(JIT_ENV, "1") == "0" and not force_jit:
        return None, f"{prebuilt_error}, and {JIT_ENV}=0 turns its JIT build off; {BUILD_HINT}"
    try:
        return _jit_build(verbose), None
    except Exception as exc:  # a compiler or ninja error: the reference/Triton backends still run
        # the first line only: torch appends the whole compiler output
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, (f"{prebuilt_error}, and its JIT build failed ({first_line}; "
                      "`regdrop-fast build-ext --verbose` shows the compiler output); "
                      f"{BUILD_HINT}")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-ext",
        help="compile the C++/CUDA extension now (torch's JIT) instead of on first use",
        description="Compile the C++/CUDA kernels of regdrop_fast for the installed torch "
                    f"(cached under {CACHE_ENV} or ~/.cache/regdrop_fast). Nothing to do when "
                    "the extension was built at install time.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    parser.set_defaults(func=_build_ext_command)


def _build_ext_command(args) -> int:
    import torch

    module, error = load(verbose=args.verbose, force_jit=True)
    if module is None:
        print(f"regdrop-fast build-ext: {error}", file=sys.stderr)
        return 1
    if module.compiled_with_cuda():
        kernels = "C++ CPU and CUDA kernels"
    else:
        cuda_possible, reason = cuda_decision(torch)
        why = "the module was built without them" if cuda_possible else reason
        kernels = f"C++ CPU kernels; no CUDA kernels: {why}"
    print(f"regdrop_fast extension ready: {module.__file__} ({kernels})")
    return 0
