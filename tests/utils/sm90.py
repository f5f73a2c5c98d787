"""Run a script that compiles Triton kernels for an H100 (sm_90) with the real compiler, in a
fresh process without the interpreter: needs no GPU, only Triton's bundled NVIDIA backend."""
import os
import subprocess
import sys

import pytest


def compile_script_for_sm90(script: str, timeout: int) -> None:
    """Skip when triton has no NVIDIA backend; else assert `script` runs and prints 'compiled'."""
    triton_backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(triton_backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
