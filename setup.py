"""Build of regdrop_fast: the Python package, the Triton kernels (installed as
regdrop_fast.triton_kernels) and the C++/CUDA extension regdrop_fast._C.

regdrop_fast._C is built from csrc/*.cpp with torch's BuildExtension (ninja) wherever a C++
compiler is present; csrc/*.cu joins when torch is a CUDA build and nvcc is found
(REGDROP_FAST_NO_CUDA=1 skips them). Without torch at build time the package installs without
the extension, and the `cpu`/`cuda` backends report how to build it.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_config():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
                 and os.environ.get("REGDROP_FAST_NO_CUDA", "0") != "1")
    # torch >= 2.10 headers use C++20; older releases (down to 2.6) build as C++17
    torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    std = "-std=c++20" if torch_version >= (2, 10) else "-std=c++17"
    cxx_flags = ["-O3", std, "-fopenmp"]
    macros = [("REGDROP_WITH_CUDA", "1")] if with_cuda else []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        ext = CUDAExtension(
            "regdrop_fast._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", std, "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension(
            "regdrop_fast._C", cpp_sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_config()

setup(
    name="regdrop_fast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for regularized fine-tuning "
                "(AD-DROP, R-Drop, ChildTuning, sparse & robust subnetworks)",
    python_requires=">=3.9",
    packages=find_packages(include=["regdrop_fast", "regdrop_fast.*"])
    + ["regdrop_fast.triton_kernels"],
    package_dir={"regdrop_fast": "regdrop_fast", "regdrop_fast.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.6", "triton>=3.4; platform_system=='Linux'",
                      "transformers>=5.0", "numpy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["regdrop-fast=regdrop_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
