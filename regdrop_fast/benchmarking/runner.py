"""Runs the benches: the package's `regdrop_fast.benchmarking.ops.<op>` modules (default) or
`bench_<op>.py` scripts of a --bench-dir; discover, import, call `run(ctx)`.

A bench that raises (on import or while running) is reported with its traceback and the others
still run; the rows it recorded before failing are kept. Every row gets the run's environment
(device name, torch/triton/python versions, timestamp, quick flag) so a results.jsonl that grows
over many runs and machines stays self-describing.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import backends
from . import BenchContext, roofline_share, time_fn

__all__ = ["BenchFailure", "RunResult", "find_benches", "packaged_benches", "select",
           "environment", "run_benches"]

_BENCH_FILE = re.compile(r"^bench_(\w+)\.py$")


@dataclass
class BenchFailure:
    bench: str
    error: str  # one line: exception type and message
    traceback: str


@dataclass
class RunResult:
    env: dict
    rows: List[dict] = field(default_factory=list)
    failures: List[BenchFailure] = field(default_factory=list)
    benches: List[str] = field(default_factory=list)


PACKAGE = "regdrop_fast.benchmarking.ops"


def packaged_benches() -> Dict[str, str]:
    """{op: module name} of the benches shipped in regdrop_fast.benchmarking.ops, by op."""
    package = importlib.import_module(PACKAGE)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__)
                   if not info.name.startswith("_"))
    return {name: f"{PACKAGE}.{name}" for name in names}


def find_benches(bench_dir: Path) -> Dict[str, Path]:
    """{op: path} for every bench_<op>.py directly in bench_dir, sorted by op."""
    found = {}
    for path in sorted(Path(bench_dir).iterdir()):
        match = _BENCH_FILE.match(path.name)
        if match and path.is_file():
            found[match.group(1)] = path
    return found


def _cpu_model_name() -> str:
    """The CPU's marketing name: /proc/cpuinfo, else lscpu, else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # a missing or broken triton must not stop CPU benchmarks
        return None
    return getattr(triton, "__version__", None)


def copy_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """Achieved GB/s (read + write) of a 1 GiB device-to-device copy: the measured ceiling that
    the GB/s of memory-bound kernels is compared with (DESIGN.md, "Benchmarks").

    CUDA only: on a CPU the bench tensors sit partly in cache and the machine is shared, so a
    DRAM copy figure would be no ceiling for them (None)."""
    if device.type != "cuda":
        return None
    src = torch.ones(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)["ms"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device) -> Optional[float]:
    """Achieved TFLOP/s of a bf16 torch.mm at 8192^3 on random data: the measured ceiling of
    the FLOP-counted rows (attention, linear). CUDA only (None on CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_fn(lambda: torch.mm(a, b), device)["ms"]
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def environment(device: torch.device, quick: bool) -> dict:
    """Fields added to every row of this run."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_model_name()
    kernel_backends = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    unavailable = {b: backends.unavailable_reason(b, device) for b in kernel_backends}
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device_name": device_name,
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # other work on the machine distorts CPU timings; kept so a reader can judge them
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # kernel backends this device could have and why any cannot run (their rows are absent)
        "unavailable_backends": {b: why for b, why in unavailable.items() if why is not None},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "timestamp": now.isoformat(timespec="seconds"),
        "run_id": now.strftime("%Y%m%dT%H%M%S.%fZ"),
        "quick": bool(quick),
        "copy_gbps": copy_bandwidth_gbps(device),
        "mm_tflops": matmul_tflops(device),
    }


def _load(op: str, source: Union[str, Path]):
    """The bench module: a packaged one by name, else a bench_<op>.py script by path."""
    if isinstance(source, str):
        module = importlib.import_module(source)
        if not callable(getattr(module, "run", None)):
            raise TypeError(f"{source} defines no run(ctx) function")
        return module
    path = source
    name = f"regdrop_fast_bench_{op}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # registered while it runs so dataclasses/pickling inside the script resolve its module
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path} defines no run(ctx) function")
    return module


def run_benches(benches: Dict[str, Union[str, Path]], device: torch.device, quick: bool,
                log=print, after_each=None) -> RunResult:
    """Run each bench in order; failures are collected, never raised.

    after_each(result, new_rows), when given, is called after every bench with the rows it
    added, so a caller can write them out before the next bench starts (a run stopped by a
    timeout then keeps what it measured)."""
    result = RunResult(env=environment(device, quick), benches=list(benches))
    for op, path in benches.items():
        ctx = BenchContext(device=device, quick=quick)
        start = time.perf_counter()
        log(f"[bench] {op}: {path}")
        try:
            _load(op, path).run(ctx)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a script is a failure too, not our exit
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, end="")
            error = type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc) else "")
            result.failures.append(BenchFailure(op, error, tb))
            log(f"[bench] {op}: FAILED after {time.perf_counter() - start:.1f} s ({error}); "
                f"{len(ctx.rows)} row(s) recorded before the failure are kept")
        else:
            log(f"[bench] {op}: {len(ctx.rows)} row(s) in {time.perf_counter() - start:.1f} s")
        finally:
            sys.modules.pop(f"regdrop_fast_bench_{op}", None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        new_rows = [{"bench": op, **row, **result.env} for row in ctx.rows]
        for row in new_rows:
            row["roofline_share"], row["roofline_of"] = roofline_share(
                row, result.env.get("copy_gbps"), result.env.get("mm_tflops"))
        result.rows.extend(new_rows)
        if after_each is not None:
            after_each(result, new_rows)
    return result


def select(available: Dict[str, Union[str, Path]], ops: Optional[Sequence[str]]) -> dict:
    """The benches named by --ops (all when None), in the order given; ValueError on unknown."""
    if not ops:
        return dict(available)
    unknown = [op for op in ops if op not in available]
    if unknown:
        raise ValueError(f"--ops: no bench for {unknown}; available: "
                         f"{sorted(available) or 'none'}")
    return {op: available[op] for op in dict.fromkeys(ops)}
