"""Benchmark plumbing shared by the benches (benchmarking.ops) and `regdrop-fast bench`.

A bench module defines `run(ctx: BenchContext) -> None` and calls `ctx.record(...)` once per
(implementation, case): baseline and ours measured in the same run, on the same device.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["BenchContext", "time_fn", "graph_replay_ms", "peak_memory_bytes", "roofline_share"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
            repeat: Optional[int] = None, budget_s: float = 0.5, rep_ms: float = 100) -> dict:
    """Median/p20/p80 wall time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (L2 flushed between runs) over about `rep_ms` of runs (raise
    it for calls of tens of ms, which 100 ms covers only once or twice). CPU: perf_counter over
    `repeat` runs (default: as many as fit in `budget_s`, between 5 and 200)."""
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    if repeat is None:
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-6)
        repeat = int(min(200, max(5, budget_s / once)))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return {"ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7]}


def _quantiles(values, qs=(0.5, 0.2, 0.8)) -> list:
    """The qs quantiles of values (linear interpolation, as torch.quantile)."""
    return torch.tensor(list(values), dtype=torch.float64).quantile(
        torch.tensor(qs, dtype=torch.float64)).tolist()


def graph_replay_ms(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Median ms of one CUDA-graph replay of fn: the GPU time of fn's kernels without the
    host's launch work (which `time_fn` includes when the host is slower than the GPU). None,
    with the reason on stderr, when fn cannot be captured (a host sync inside it, say)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: compiles, allocator pools
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_fn(graph.replay, device)["ms"]
    except Exception as exc:  # report and go on: the plain timing stands without it
        print(f"  CUDA graph capture failed: {type(exc).__name__}: "
              f"{(str(exc).splitlines() or [''])[0][:200]}", file=sys.stderr, flush=True)
        _sync(device)
        return None


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak device memory allocated while fn() runs, above what was allocated before.

    CUDA only (torch's caching allocator statistics); None on CPU, where torch keeps no
    allocator statistics that could be reset per call."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def roofline_share(row: dict, copy_gbps: Optional[float], mm_tflops: Optional[float]):
    """(share, ceiling name) of a row: FLOP rate / measured bf16 matmul rate when the row
    counts FLOPs (attention, linear), else GB/s / measured copy bandwidth when it counts bytes;
    (None, None) without a count or a ceiling (a CPU run measures none)."""
    if row.get("tflops") is not None and mm_tflops:
        return row["tflops"] / mm_tflops, "mm"
    if row.get("gbps") is not None and copy_gbps:
        return row["gbps"] / copy_gbps, "copy"
    return None, None


@dataclass
class BenchContext:
    """What a bench script gets: the device, the size regime and a sink for result rows."""

    device: torch.device
    quick: bool = False
    rows: list = field(default_factory=list)

    def measure(self, fn: Callable[[], object], **timing) -> dict:
        """ms/p20_ms/p80_ms (eager), peak_mem_bytes and, on CUDA, graph_ms (median of a
        CUDA-graph replay: the GPU time without the host's launch work) and host_ms = ms -
        graph_ms, the host overhead per call that the eager time carries."""
        result = time_fn(fn, self.device, **timing)
        result["peak_mem_bytes"] = peak_memory_bytes(fn, self.device)
        if self.device.type == "cuda":
            graph = graph_replay_ms(fn, self.device)
            result["graph_ms"] = graph
            result["host_ms"] = None if graph is None else result["ms"] - graph
        return result

    def measure_rounds(self, fns: dict, *, baseline: str, rounds: int, **timing) -> dict:
        """{name: timing} of the functions in `fns`, measured in `rounds` alternating rounds
        (order reversed every other round) so that drift on a shared machine hits them alike.
        Each round is one `measure` per function. Per function: ms = median of its round
        medians, p20_ms/p80_ms their spread, and, against `baseline`, the per-round speedups
        (baseline ms / fn ms of the same round): paired_speedup (median), paired_p20,
        paired_p80. A round pairs two measurements taken seconds apart, so its ratio carries
        less of the drift than the ratio of the two medians does."""
        if baseline not in fns:
            raise ValueError(f"baseline {baseline!r} is not one of the functions {list(fns)}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        per_round = {name: [] for name in fns}
        last = {}
        for r in range(rounds):
            order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
            for name, fn in order:
                last[name] = self.measure(fn, **timing)
                per_round[name].append(last[name]["ms"])
        timings = {}
        for name, values in per_round.items():
            ms, p20, p80 = _quantiles(values)
            ratios = [b / v for b, v in zip(per_round[baseline], values)]
            speedup, speedup_p20, speedup_p80 = _quantiles(ratios)
            timings[name] = dict(last[name], ms=ms, p20_ms=p20, p80_ms=p80, rounds=rounds,
                                 paired_speedup=speedup, paired_p20=speedup_p20,
                                 paired_p80=speedup_p80)
        return timings

    def record(self, *, op: str, impl: str, baseline: str, case: str, dtype: str,
               ms: float, bytes_moved: Optional[float] = None, flops: Optional[float] = None,
               peak_mem_bytes: Optional[int] = None, **extra) -> dict:
        """One result row. `impl` is what was timed, `baseline` the impl it is compared with
        (equal to impl for the baseline's own row); bytes_moved/flops give GB/s and TFLOP/s."""
        row = {"op": op, "impl": impl, "baseline": baseline, "case": case, "dtype": dtype,
               "device": str(self.device), "ms": ms,
               "gbps": None if bytes_moved is None else bytes_moved / (ms * 1e-3) / 1e9,
               "tflops": None if flops is None else flops / (ms * 1e-3) / 1e12,
               "peak_mem_bytes": peak_mem_bytes, **extra}
        self.rows.append(row)
        # one line per row as it is measured: a log cut short still shows the numbers
        print(f"  {op} | {case} | {dtype} | {impl}: {ms:.4g} ms", file=sys.stderr, flush=True)
        return row
