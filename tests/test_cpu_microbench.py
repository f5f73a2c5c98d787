"""benchmarks/cpu/: the micro-benchmarks the README's CPU analysis quotes still build and call
the op as it is now (they are analysis tools, not run by `make test`)."""
import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from regdrop_fast import backends

ROOT = Path(__file__).resolve().parents[1]
CPU_BENCH = ROOT / "benchmarks" / "cpu"


@pytest.fixture(scope="module")
def in_cache():
    spec = importlib.util.spec_from_file_location(
        "masked_adamw_in_cache", CPU_BENCH / "masked_adamw_in_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_cache_kinds_are_the_ops_mask_kinds(in_cache):
    header = (ROOT / "csrc" / "masked_adamw.h").read_text()
    names = {"none": "kMaskNone", "F": "kMaskPhilox", "D": "kMaskBits"}
    assert set(in_cache.KINDS) == set(names)
    for kind, value in in_cache.KINDS.items():
        assert f"constexpr int {names[kind]} = {value};" in header


def test_in_cache_timing_calls_the_op_for_every_mask_kind(in_cache):
    reason = backends.unavailable_reason("cpu", "cpu")
    if reason is not None:
        pytest.skip(reason)
    for kind in in_cache.KINDS.values():
        seconds = in_cache.seconds_per_call(96, kind, reps=2)
        assert 0.0 < seconds < 1.0


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                    reason="needs g++ for x86-64 (AVX-512 intrinsics)")
def test_vector_pipes_compiles(tmp_path):
    # compile and link only: running it needs an AVX-512 CPU
    out = tmp_path / "vector_pipes"
    proc = subprocess.run(["g++", "-O2", "-std=c++17", str(CPU_BENCH / "vector_pipes.cpp"), "-o",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
