"""Build of regdrop_fast: the Python package, the Triton kernels (installed as
regdrop_fast.triton_kernels), the csrc sources (installed as package data, for the JIT build)
and, when the build can see the torch it will run with, the C++/CUDA extension regdrop_fast._C.

- `pip install .` (isolated build: no torch in the build environment) installs no extension;
  it is compiled on first use with torch's JIT (regdrop_fast/_extension.py).
- `pip install --no-build-isolation .` builds regdrop_fast._C against the installed torch when a
  C++ compiler works; a failed build only warns (the JIT remains), unless
  REGDROP_FAST_BUILD_EXT=1, which makes it an error (`make build`). REGDROP_FAST_BUILD_EXT=0
  skips it. The .cu files join on a CUDA torch with nvcc and a CUDA arch to target (a GPU or
  TORCH_CUDA_ARCH_LIST); REGDROP_FAST_NO_CUDA=1 leaves them out.
"""
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_ENV = "REGDROP_FAST_BUILD_EXT"


def _extension_helpers():
    # by path: importing the package would import torch, which an isolated build lacks
    spec = importlib.util.spec_from_file_location(
        "_regdrop_fast_extension", os.path.join(ROOT, "regdrop_fast", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message):
    print(f"regdrop_fast setup: {message}", flush=True)


def extension_config():
    mode = os.environ.get(BUILD_ENV, "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{BUILD_ENV} must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _say(f"{BUILD_ENV}=0: not building regdrop_fast._C")
        return [], {}
    try:
        import torch  # noqa: F401  (only the torch this build can see is ever built against)
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise RuntimeError(f"{BUILD_ENV}=1 but torch cannot be imported in the build "
                               "environment: install torch, then pip install --no-build-isolation")
        _say("torch is not importable here (isolated build): regdrop_fast._C is not built; it is "
             "compiled on first use (or by `regdrop-fast build-ext`) against the installed torch")
        return [], {}
    helpers = _extension_helpers()
    compiler_error = helpers.compiler_error()
    if compiler_error:
        if mode == "1":
            raise RuntimeError(f"{BUILD_ENV}=1 but {compiler_error}")
        _say(f"{compiler_error}: regdrop_fast._C is not built (reference/Triton backends only)")
        return [], {}
    config = helpers.build_config(os.path.join(ROOT, "csrc"))
    # relative sources: setuptools rejects absolute paths in an installed build's SOURCES.txt
    sources = [os.path.relpath(path, ROOT) for path in config["sources"]]
    _say(f"building regdrop_fast._C against torch {torch.__version__} "
         f"({'with' if config['with_cuda'] else 'without'} CUDA: {config['cuda_reason']})")
    common = {"include_dirs": config["include_dirs"], "define_macros": config["define_macros"],
              "extra_link_args": config["link_flags"]}
    if config["with_cuda"]:
        ext = CUDAExtension("regdrop_fast._C", sources, **common, extra_compile_args={
            "cxx": config["cxx_flags"], "nvcc": config["nvcc_flags"]})
    else:
        ext = CppExtension("regdrop_fast._C", sources, **common,
                           extra_compile_args={"cxx": config["cxx_flags"]})

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the package installable (the JIT may still work later)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler/linker errors come as several distutils types
                if mode == "1":
                    raise
                _say(f"building regdrop_fast._C failed ({exc}); installing without it "
                     f"(set {BUILD_ENV}=1 to make this an error)")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_config()

HF = ["transformers>=5.0", "accelerate>=1.1", "safetensors", "numpy", "tqdm", "matplotlib"]
TEST = ["pytest", "hypothesis"]

setup(
    name="regdrop_fast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for regularized fine-tuning "
                "(AD-DROP, R-Drop, ChildTuning, sparse & robust subnetworks)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["regdrop_fast", "regdrop_fast.*"])
    + ["regdrop_fast.triton_kernels", "regdrop_fast.csrc"],
    package_dir={"regdrop_fast": "regdrop_fast", "regdrop_fast.triton_kernels": "triton_kernels",
                 "regdrop_fast.csrc": "csrc"},
    package_data={"regdrop_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    # ninja: torch's JIT build of the extension needs it
    install_requires=["torch>=2.6", "triton>=3.4; platform_system=='Linux'", "ninja"],
    extras_require={"hf": HF, "test": TEST, "all": HF + TEST},
    entry_points={"console_scripts": ["regdrop-fast=regdrop_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
