"""nvcc compile-only pass over every csrc/*.cu and the CUDA-only host files (`make check-cuda`):
catches CUDA build errors on machines without a GPU or a CUDA build of torch.

The CUDA-only host files are the csrc/*.cpp whose code is inside `#ifdef REGDROP_WITH_CUDA`
(the CUDA ops of csrc/cuda_ops.cpp): a CPU build compiles them empty, so only this pass sees
their code; nvcc hands them to the host compiler with the CUDA include path, as the CUDA build
does.

Each file is compiled to a temporary object with torch's include dirs, the Python headers and the
flags the extension build uses, plus -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE (the CPU wheel ships no
c10/cuda/impl/cuda_cmake_macros.h). Prints `<file> OK|FAIL` per file and nvcc's output for
failures; exits 1 if any fails, 0 with "skipped: nvcc not found" when there is no nvcc.
Usage: python tools/check_cuda.py [file ...] (default: csrc/*.cu and the CUDA-only .cpp files).
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_JOBS = 2  # the CI machine has 2 cores shared with other jobs


def find_nvcc():
    candidates = [os.environ.get("NVCC")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def nvcc_flags():
    import torch
    from torch.utils.cpp_extension import include_paths

    includes = [os.path.join(ROOT, "csrc"), *include_paths(), sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-std=c++20",
        "-O0",
        "-arch=sm_90",  # H100, the target GPU: device code is assembled for it too
        "--expt-relaxed-constexpr",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DREGDROP_WITH_CUDA=1",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        # torch's own extension build defines these to keep device code away from half operators
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-Xcompiler=-fPIC",
        *(f"-I{path}" for path in includes),
    ]


def default_sources():
    cuda = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    host = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))):
        with open(path, encoding="utf-8") as f:
            if "#ifdef REGDROP_WITH_CUDA" in f.read():
                host.append(path)
    return cuda + host


def compile_one(nvcc, flags, source, out_dir):
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    proc = subprocess.run([nvcc, *flags, "-c", source, "-o", obj], capture_output=True, text=True)
    return source, proc.returncode, (proc.stdout + proc.stderr).strip()


def main(argv):
    nvcc = find_nvcc()
    if nvcc is None:
        print("check-cuda skipped: nvcc not found (set CUDA_HOME or NVCC to check the .cu files)")
        return 0
    sources = [os.path.abspath(path) for path in argv] or default_sources()
    if not sources:
        print("check-cuda: no CUDA sources under csrc/")
        return 0
    flags = nvcc_flags()
    print(f"check-cuda: {nvcc} on {len(sources)} file(s)", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="regdrop-check-cuda-") as out_dir, \
            concurrent.futures.ThreadPoolExecutor(max_workers=MAX_JOBS) as pool:
        jobs = [pool.submit(compile_one, nvcc, flags, src, out_dir) for src in sources]
        for job in jobs:
            source, code, output = job.result()
            name = os.path.relpath(source, ROOT) if source.startswith(ROOT + os.sep) else source
            print(f"{name} {'OK' if code == 0 else 'FAIL'}", flush=True)
            if code != 0:
                failed.append(name)
                print(output, flush=True)
    if failed:
        print(f"check-cuda: {len(failed)} of {len(sources)} failed: {', '.join(failed)}")
        return 1
    print(f"check-cuda: all {len(sources)} compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
