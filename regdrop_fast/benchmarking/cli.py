"""`regdrop-fast bench`: run the bench_<op>.py scripts; write results.jsonl/.md/.png.

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

__all__ = ["add_parser", "default_bench_dir", "main"]


def default_bench_dir() -> Path:
    """The repository's benchmarks/: the package is installed editable, so it lies beside it."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run the kernel benchmarks (baseline and ours in the same run)",
        description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (well under a minute on a 2-core CPU)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="benches to run, by the <op> of bench_<op>.py (default: all found)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR",
                        help="output directory for results.jsonl/.md/.png (default: bench_out)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark (default: cuda if available, else cpu)")
    parser.add_argument("--bench-dir", type=Path, default=None, metavar="DIR",
                        help="directory holding bench_<op>.py (default: the repository's "
                             "benchmarks/ next to the package source)")
    parser.set_defaults(func=main)
    return parser


def _fail(message: str) -> int:
    print(f"regdrop-fast bench: error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    from . import report, runner

    bench_dir = args.bench_dir if args.bench_dir is not None else default_bench_dir()
    if not bench_dir.is_dir():
        hint = ("" if args.bench_dir is not None else
                " (the default is the repository's benchmarks/ beside the package source, which "
                "exists only for an editable install: `pip install --no-build-isolation -e .` "
                "from the repository); pass --bench-dir DIR")
        return _fail(f"bench directory {bench_dir} not found{hint}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is visible (torch.cuda.is_available() is "
                     "False)")
    if args.device == "cuda" and backends.interpreter_enabled():
        return _fail("TRITON_INTERPRET=1 is set: Triton kernels would run in the interpreter, "
                     "whose timings are not performance; unset it for a CUDA benchmark")
    try:
        benches = runner.select(runner.find_benches(bench_dir), args.ops)
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
