"""`regdrop-fast bench`: run the benchmarks; write results.jsonl/.md/.png.

The markdown table is also printed to stdout; progress and tracebacks go to stderr.

Exit status: 0 when every bench ran, 1 when any failed (the others still report), 2 for bad
arguments (unknown op, missing bench directory, CUDA asked for but absent).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import backends

__all__ = ["add_parser", "main"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run the kernel benchmarks (baseline and ours in the same run)",
        description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (well under a minute on a 2-core CPU)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="benches to run, by op name (default: all found)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR",
                        help="output directory for results.jsonl/.md/.png (default: bench_out)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark (default: cuda if available, else cpu)")
    parser.add_argument("--bench-dir", type=Path, default=None, metavar="DIR",
                        help="run the bench_<op>.py scripts of DIR instead of the benches "
                             "shipped in regdrop_fast.benchmarking.ops")
    parser.set_defaults(func=main)
    return parser


def _fail(message: str) -> int:
    print(f"regdrop-fast bench: error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    from . import report, runner

    bench_dir = args.bench_dir
    if bench_dir is not None and not bench_dir.is_dir():
        return _fail(f"bench directory {bench_dir} not found")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is visible (torch.cuda.is_available() is "
                     "False)")
    if args.device == "cuda" and backends.interpreter_enabled():
        return _fail("TRITON_INTERPRET=1 is set: Triton kernels would run in the interpreter, "
                     "whose timings are not performance; unset it for a CUDA benchmark")
    found = runner.packaged_benches() if bench_dir is None else runner.find_benches(bench_dir)
    try:
        benches = runner.select(found, args.ops)
    except ValueError as exc:
        return _fail(str(exc))
    if not benches:
        return _fail(f"no bench_<op>.py in {bench_dir}")

    device = torch.device(args.device)
    # rows are written after each bench, so a run cut short keeps the benches it finished
    result = runner.run_benches(
        benches, device, args.quick, log=lambda msg: print(msg, file=sys.stderr, flush=True),
        after_each=lambda result, rows: report.write_outputs(result, args.out, device.type,
                                                             new_rows=rows, with_plot=False))
    paths = report.write_outputs(result, args.out, device.type, new_rows=[])
    print(paths["md"].read_text(encoding="utf-8"), end="")
    written = [f"{paths['jsonl']} (appended)", str(paths["md"])]
    if paths["png"]:
        written.append(str(paths["png"]))
    print("wrote " + ", ".join(written), file=sys.stderr)
    if result.failures:
        names = ", ".join(f.bench for f in result.failures)
        print(f"regdrop-fast bench: {len(result.failures)} bench(es) failed: {names}",
              file=sys.stderr)
        return 1
    return 0
